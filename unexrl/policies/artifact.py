"""The ``weights`` artifact kind: fixed fusion weights (CEM, its per-group variants, greedy), never pickled code.

    <dir>/weights.pt       tensors only, loaded with torch.load(weights_only=True)
    <dir>/manifest.json    WeightsManifest: the common manifest (unexrl/contracts/artifact.py) and the grouping

Loading verifies the directory (every file listed and hashed) and that the artifact's stages match the config it
will run under; a tampered or mismatched artifact is refused with an error that says what differs. Trained actors
are the ``actors`` kind (unexrl/rl/actors.py); unexrl/artifacts.py loads either.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from unexrl.config import Config
from unexrl.contracts.artifact import ArtifactError, ArtifactManifest, read_artifact
from unexrl.contracts.base import STRICT
from unexrl.io import atomic_directory, sha256_file
from unexrl.policies.weights import GroupBy, WeightPolicy

WEIGHTS = "weights.pt"


class WeightsManifest(ArtifactManifest):
    """A fixed-weight policy: one weight vector per group of ``group_by``."""

    model_config = STRICT
    KIND: ClassVar[str | None] = "weights"

    kind: Literal["weights"]
    group_by: GroupBy
    extra: dict[str, Any] = Field(default_factory=dict)
    """what the policy's maker wants recorded (e.g. how it was tuned)"""


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
        WeightsManifest.for_config(
            cfg,
            algorithm=algorithm,
            files={WEIGHTS: sha256_file(tmp / WEIGHTS)},
            group_by=policy.group_by,
            extra=extra or {},
        ).publish(tmp)
    return Path(out_dir)


def load_policy(path: Path, cfg: Config) -> WeightPolicy:
    """Load a verified weights artifact as a policy for ``cfg``'s cascade."""
    return load_weights_artifact(path, cfg)[0]


def load_weights_artifact(path: Path, cfg: Config) -> tuple[WeightPolicy, WeightsManifest]:
    """A verified weights artifact as a policy for ``cfg``'s cascade, with the manifest it was verified against
    (for a reader that records where the weights came from without reading the directory a second time)."""
    path = Path(path)
    manifest = read_artifact(path, WeightsManifest)
    manifest.check_compatible(cfg, path)
    state = torch.load(
        io.BytesIO(manifest.read_listed(path, WEIGHTS)), map_location=cfg.device, weights_only=True
    )
    weights = state["weights"]
    n_groups = 1 if manifest.group_by == "none" else len(cfg.world.user_types)
    if weights.shape != (n_groups, sum(cfg.cascade.action_dims)):
        raise ArtifactError(
            f"{path}: weights of shape {tuple(weights.shape)} do not fit {n_groups} groups x "
            f"{sum(cfg.cascade.action_dims)} dims"
        )
    low, high = cfg.cascade.action_low, cfg.cascade.action_high
    if not (weights.isfinite().all() and weights.ge(low).all() and weights.le(high).all()):
        raise ArtifactError(
            f"{path}: weights outside the cascade's action bounds [{low}, {high}] (or not finite)"
        )
    return WeightPolicy(weights.float(), cfg.cascade, group_by=manifest.group_by), manifest
