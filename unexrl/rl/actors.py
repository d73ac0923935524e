"""Trained stage actors as a policy: the ``actors`` artifact that `unexrl train` exports (unexrl/train/export.py).

    <dir>/actors.safetensors   the whole (unsharded) actors' state: MLPs, embedding tables, fixed CEM stages
    <dir>/manifest.json        ActorsManifest (unexrl/contracts/actors.py): the common manifest, the feature schema
                               and the run's provenance

The actors are rebuilt from the training config recorded in the manifest (their widths are the artifact's), then
bound to the serving config: stages, feature schema and id space must match, else the artifact is refused.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load

from unexrl.config import Config
from unexrl.contracts.actors import ActorsManifest, FeatureSchema, IdSpace, UserFeatureInputs
from unexrl.contracts.artifact import ArtifactError, read_artifact
from unexrl.rl.agent import build_actors
from unexrl.rl.observation import SPARSE_FEATURES, STATE_FEATURES
from unexrl.rl.policy import ActorPolicy
from unexrl.sim.world import World, build_world
from unexrl.user_features import COLUMNS

ACTORS_FILE = "actors.safetensors"


def feature_schema(cfg: Config) -> FeatureSchema:
    """What the actors' inputs mean under ``cfg``: features, their order and scaling, and the tables' id space."""
    return FeatureSchema(
        sparse=list(SPARSE_FEATURES),
        state=list(STATE_FEATURES),
        history_window=cfg.session.history_window,
        activity_groups=len(cfg.world.user_types),
        max_requests=cfg.session.max_requests,
        user_features=UserFeatureInputs(
            columns=list(COLUMNS),
            recent_items=cfg.features.recent_items,
            duration_median_s=cfg.world.duration_median_s,
        )
        if cfg.algo.user_features
        else None,
        id_space=IdSpace(
            world_seed=cfg.seeds.world,
            users=cfg.world.n_users,
            items=cfg.world.n_items,
            categories=cfg.world.n_categories,
        ),
    )


def load_actor_policy(path: Path, cfg: Config, world: World | None = None) -> ActorPolicy:
    """Verify and load an actors artifact as the greedy actors for ``cfg``'s cascade and world (``world``: the
    simulator's, else built from ``cfg``)."""
    return load_actors_artifact(path, cfg, world)[0]


def load_actors_artifact(
    path: Path, cfg: Config, world: World | None = None
) -> tuple[ActorPolicy, ActorsManifest]:
    """:func:`load_actor_policy`, with the manifest the artifact was verified against (its identity included)."""
    path = Path(path)
    manifest = read_artifact(path, ActorsManifest)
    manifest.check_compatible(cfg, path)
    manifest.check_features(feature_schema(cfg), path)
    trained = manifest.trained_config()
    try:
        state = load(manifest.read_listed(path, ACTORS_FILE))
    except SafetensorError as err:
        raise ArtifactError(f"{path}: unreadable actors artifact ({err})") from None
    if broken := [name for name, t in state.items() if t.is_floating_point() and not t.isfinite().all()]:
        raise ArtifactError(
            f"{path}: non-finite values in {', '.join(sorted(broken))}; refusing diverged actors"
        )
    ids = manifest.features.id_space
    # zeros stand in for the CEM weights: every buffer (action bounds, fixed stages' weights) loads from the artifact
    placeholder = torch.zeros(sum(cfg.cascade.action_dims))
    actors = build_actors(trained, ids.users, ids.items, ids.categories, placeholder)
    try:
        actors.load_state_dict(state)
    except RuntimeError as err:
        raise ArtifactError(f"{path}: weights do not fit the actors of its own config: {err}") from None
    device = torch.device(cfg.device)
    policy = ActorPolicy(
        actors.to(device).eval().requires_grad_(False), cfg, world if world is not None else build_world(cfg)
    )
    return policy, manifest
