"""Every policy artifact kind and its loader: the one place that knows them all, above the packages that define
them (the manifest layer, unexrl/contracts/artifact.py, knows none)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from unexrl.config import Config
from unexrl.contracts.artifact import ArtifactError, ArtifactManifest, peek_manifest
from unexrl.policies.artifact import WeightsManifest, load_weights_artifact
from unexrl.sim.env import Policy
from unexrl.sim.world import World

Loader = Callable[[Path, Config, World | None], tuple[Policy, ArtifactManifest]]


def _weights(path: Path, cfg: Config, world: World | None) -> tuple[Policy, ArtifactManifest]:
    return load_weights_artifact(path, cfg)


def _actors(path: Path, cfg: Config, world: World | None) -> tuple[Policy, ArtifactManifest]:
    from unexrl.rl.actors import load_actors_artifact  # TorchRec is imported only when actors are loaded

    return load_actors_artifact(path, cfg, world)


LOADERS: dict[str, Loader] = {WeightsManifest.KIND: _weights, "actors": _actors}  # type: ignore[dict-item]
"""kind -> loader; a new kind adds its entry here"""


def load_any_artifact(path: Path, cfg: Config, world: World | None = None) -> tuple[Policy, ArtifactManifest]:
    """Load a verified artifact of any known kind (``world`` maps trained actors' ids), with the manifest it was
    verified against: what a reader records about it (its identity, its seen seeds) comes from that one reading.
    The kind picks the loader; the loader verifies the directory (read_artifact), once."""
    kind = peek_manifest(Path(path)).kind
    if kind not in LOADERS:
        raise ArtifactError(f"{path}: artifact kind {kind!r}; this version loads {sorted(LOADERS)}")
    return LOADERS[kind](Path(path), cfg, world)


def load_any_policy(path: Path, cfg: Config, world: World | None = None) -> Policy:
    """:func:`load_any_artifact`'s policy."""
    return load_any_artifact(path, cfg, world)[0]
