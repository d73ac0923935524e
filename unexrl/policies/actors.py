"""Trained stage actors as a policy: the ``actors`` artifact that `unexrl train` exports (unexrl/train/export.py).

    <dir>/actors.safetensors   the whole (unsharded) actors' state: MLPs, embedding tables, fixed CEM stages
    <dir>/manifest.json        as every artifact (unexrl/policies/artifact.py), plus the feature schema

The actors are rebuilt from the training config recorded in the manifest (their widths are the artifact's), then
bound to the serving config: stages, feature schema and id space must match, else the artifact is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from unexrl.config import Config
from unexrl.policies.artifact import ArtifactError, check_compatible, read_manifest
from unexrl.rl.agent import build_actors
from unexrl.rl.observation import SPARSE_FEATURES, STATE_FEATURES
from unexrl.rl.policy import ActorPolicy
from unexrl.sim.world import World, build_world

KIND = "actors"
ACTORS_FILE = "actors.safetensors"


def feature_schema(cfg: Config) -> dict[str, Any]:
    """What the actors' inputs mean: features, state scaling, activity groups and the id space of their tables."""
    return {
        "sparse": list(SPARSE_FEATURES),
        "state": list(STATE_FEATURES),
        "activity_groups": len(cfg.world.user_types),
        "max_requests": cfg.session.max_requests,
        "id_space": {
            "world_seed": cfg.seeds.world,
            "users": cfg.world.n_users,
            "items": cfg.world.n_items,
            "categories": cfg.world.n_categories,
        },
    }


def actor_policy(
    path: Path, manifest: dict[str, Any], cfg: Config, world: World | None = None
) -> ActorPolicy:
    """The greedy actors of a verified manifest (``read_manifest``) for ``cfg``'s cascade and world."""
    if manifest.get("kind") != KIND:
        raise ArtifactError(f"{path}: artifact kind {manifest.get('kind')!r}, not trained {KIND}")
    check_compatible(manifest, cfg, path, features=feature_schema(cfg))
    try:
        trained = Config.model_validate_json(json.dumps(manifest["config"]))
        state = load_file(path / ACTORS_FILE)
    except (KeyError, ValueError, SafetensorError) as err:
        raise ArtifactError(f"{path}: unreadable actors artifact ({err})") from None
    ids = manifest["features"]["id_space"]
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


def load_actor_policy(path: Path, cfg: Config, world: World | None = None) -> ActorPolicy:
    """Verify and load an actors artifact (``world``: the simulator's, else built from ``cfg``)."""
    path = Path(path)
    return actor_policy(path, read_manifest(path), cfg, world)
