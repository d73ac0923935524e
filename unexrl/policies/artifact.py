"""PolicyArtifact: a directory with weights and a manifest, verified before use, never pickled code.

    <dir>/weights.pt       tensors only, loaded with torch.load(weights_only=True)
    <dir>/manifest.json    schema version, kind, algorithm, stage names and action dims, config, sha256 of files

That is the ``weights`` kind (fixed fusion weights); trained stage actors are the ``actors`` kind
(unexrl/policies/actors.py). :func:`load_any_policy` loads either.

Loading checks every file's sha256 and that the artifact's stages match the config it will run under; a
tampered or mismatched artifact is refused with an error that says what differs.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from unexrl.config import Config
from unexrl.io import atomic_directory, sha256_file
from unexrl.policies.weights import WeightPolicy
from unexrl.sim.env import Policy
from unexrl.sim.world import World

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.pt"


class ArtifactError(ValueError):
    """An artifact that is incomplete, tampered with, or built for another cascade."""


def stage_signature(cfg: Config) -> list[dict[str, Any]]:
    """What a policy is bound to: each stage's name, heads (action order) and candidate count."""
    return [{"name": s.name, "heads": list(s.heads), "keep": s.keep} for s in cfg.cascade.stages]


def save_weight_policy(
    policy: WeightPolicy,
    out_dir: Path,
    cfg: Config,
    algorithm: str,
    extra: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a fixed-weight policy as an artifact (atomically)."""
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        torch.save({"weights": policy.weights.detach().cpu().contiguous()}, tmp / WEIGHTS)
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "kind": "weights",
            "algorithm": algorithm,
            "group_by": policy.group_by,
            "stages": stage_signature(cfg),
            "pool_size": cfg.cascade.pool_size,
            "action_bounds": [cfg.cascade.action_low, cfg.cascade.action_high],
            "config": cfg.to_dict(),
            "created_at": datetime.now(UTC).isoformat(),
            "extra": extra or {},
            "files": {WEIGHTS: sha256_file(tmp / WEIGHTS)},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return Path(out_dir)


def read_manifest(path: Path) -> dict[str, Any]:
    """Read and verify an artifact's manifest: schema version and every file's sha256."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{path}: no {MANIFEST}; not a policy artifact")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{manifest_path}: not valid JSON ({err})") from None
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ArtifactError(
            f"{manifest_path}: schema_version {manifest.get('schema_version')!r}, expected {SCHEMA_VERSION}"
        )
    for name, expected in manifest.get("files", {}).items():
        file = path / name
        if not file.is_file():
            raise ArtifactError(f"{path}: file {name} listed in the manifest is missing")
        actual = sha256_file(file)
        if actual != expected:
            raise ArtifactError(
                f"{file}: sha256 {actual[:12]}... does not match the manifest's {expected[:12]}...; refusing a tampered artifact"
            )
    return manifest


def check_compatible(
    manifest: dict[str, Any], cfg: Config, where: Path, features: dict[str, Any] | None = None
) -> None:
    """Refuse an artifact whose stages, heads or sizes differ from the cascade it would run in.

    ``features``: the serving side's feature schema, for kinds whose weights read features (trained actors).
    """
    ours = stage_signature(cfg)
    theirs = manifest.get("stages")
    if theirs != ours:
        raise ArtifactError(f"{where}: built for stages {theirs}, but the config has {ours}")
    if manifest.get("pool_size") != cfg.cascade.pool_size:
        raise ArtifactError(
            f"{where}: built for pool size {manifest.get('pool_size')}, config has {cfg.cascade.pool_size}"
        )
    if features is not None:
        theirs_features = manifest.get("features") or {}
        differ = {k: (theirs_features.get(k), v) for k, v in features.items() if theirs_features.get(k) != v}
        if differ:
            raise ArtifactError(f"{where}: feature schema differs (artifact, config): {differ}")


def load_policy(path: Path, cfg: Config) -> WeightPolicy:
    """Load a verified artifact as a policy for ``cfg``'s cascade."""
    path = Path(path)
    manifest = read_manifest(path)
    check_compatible(manifest, cfg, path)
    if manifest.get("kind") != "weights":
        raise ArtifactError(f"{path}: artifact kind {manifest.get('kind')!r} is not loadable here")
    state = torch.load(path / WEIGHTS, map_location=cfg.device, weights_only=True)
    weights = state["weights"]
    n_groups = 1 if manifest["group_by"] == "none" else len(cfg.world.user_types)
    if weights.shape != (n_groups, sum(cfg.cascade.action_dims)):
        raise ArtifactError(
            f"{path}: weights of shape {tuple(weights.shape)} do not fit {n_groups} groups x {sum(cfg.cascade.action_dims)} dims"
        )
    return WeightPolicy(weights.float(), cfg.cascade, group_by=manifest["group_by"])


def load_any_policy(path: Path, cfg: Config, world: World | None = None) -> Policy:
    """Load a verified artifact of any kind: fixed weights, or trained actors (``world`` maps their ids)."""
    path = Path(path)
    manifest = read_manifest(path)
    if manifest.get("kind") == "actors":
        from unexrl.policies.actors import actor_policy  # TorchRec is imported only when actors are loaded

        return actor_policy(path, manifest, cfg, world)
    return load_policy(path, cfg)
