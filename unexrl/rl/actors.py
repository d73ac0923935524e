"""Trained stage actors as a policy: the ``actors`` artifact that `unexrl train` exports (unexrl/train/export.py).

    <dir>/actors.safetensors   the whole (unsharded) actors' state: MLPs, embedding tables, fixed CEM stages
    <dir>/manifest.json        ActorsManifest: the common manifest, the feature schema and the run's provenance

The actors are rebuilt from the training config recorded in the manifest (their widths are the artifact's), then
bound to the serving config: stages, feature schema and id space must match, else the artifact is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from unexrl.config import Config
from unexrl.contracts.artifact import ArtifactError, ArtifactManifest, read_artifact
from unexrl.contracts.base import STRICT
from unexrl.rl.agent import build_actors
from unexrl.rl.observation import SPARSE_FEATURES, STATE_FEATURES
from unexrl.rl.policy import ActorPolicy
from unexrl.sim.world import World, build_world
from unexrl.user_features import COLUMNS

ACTORS_FILE = "actors.safetensors"


class ActorsManifest(ArtifactManifest):
    """Trained actors: what their inputs mean, which stages learned, and what the run that made them did."""

    model_config = STRICT
    KIND: ClassVar[str | None] = "actors"

    kind: Literal["actors"]
    learning_stages: list[int]
    features: dict[str, Any]
    """feature_schema() of the training config, plus the embedding tables' shapes"""
    training_data: dict[str, Any]
    """the logs' sha256s and training set (offline), or the simulator seeds (online)"""
    fixed_stages: dict[str, Any]
    """where the non-learning stages' CEM weights came from"""
    training: dict[str, Any]
    """updates, resume point, world size and table placement"""
    evaluation: dict[str, Any] | None = None
    """the validation curve of the run"""
    selection: dict[str, Any] | None = None
    """which validation point's actors these are"""

    def check_features(self, cfg: Config, where: Path) -> None:
        """Refuse actors whose inputs mean something else under ``cfg`` (features, scaling, id space)."""
        ours = feature_schema(cfg)
        differ = {k: (self.features.get(k), v) for k, v in ours.items() if self.features.get(k) != v}
        if differ:
            raise ArtifactError(f"{where}: feature schema differs (artifact, config): {differ}")


def feature_schema(cfg: Config) -> dict[str, Any]:
    """What the actors' inputs mean: features (the user feature row's columns, unexrl.user_features), state
    scaling, activity groups and the id space of their tables."""
    return {
        "sparse": list(SPARSE_FEATURES),
        "state": list(STATE_FEATURES),
        "user_features": list(COLUMNS) if cfg.algo.user_features else [],
        "activity_groups": len(cfg.world.user_types),
        "max_requests": cfg.session.max_requests,
        "id_space": {
            "world_seed": cfg.seeds.world,
            "users": cfg.world.n_users,
            "items": cfg.world.n_items,
            "categories": cfg.world.n_categories,
        },
    }


def load_actor_policy(path: Path, cfg: Config, world: World | None = None) -> ActorPolicy:
    """Verify and load an actors artifact as the greedy actors for ``cfg``'s cascade and world (``world``: the
    simulator's, else built from ``cfg``)."""
    path = Path(path)
    manifest = read_artifact(path, ActorsManifest)
    manifest.check_compatible(cfg, path)
    manifest.check_features(cfg, path)
    trained = manifest.trained_config()
    try:
        state = load_file(manifest.listed(path, ACTORS_FILE))
    except SafetensorError as err:
        raise ArtifactError(f"{path}: unreadable actors artifact ({err})") from None
    ids = manifest.features["id_space"]
    # zeros stand in for the CEM weights: every buffer (action bounds, fixed stages' weights) loads from the artifact
    placeholder = torch.zeros(sum(cfg.cascade.action_dims))
    actors = build_actors(trained, ids["users"], ids["items"], ids["categories"], placeholder)
    try:
        actors.load_state_dict(state)
    except RuntimeError as err:
        raise ArtifactError(f"{path}: weights do not fit the actors of its own config: {err}") from None
    device = torch.device(cfg.device)
    return ActorPolicy(
        actors.to(device).eval().requires_grad_(False), cfg, world if world is not None else build_world(cfg)
    )
