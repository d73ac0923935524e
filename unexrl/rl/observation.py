"""tau^1 as the learner sees it, and the inputs each network builds from it.

The first-stage observation tau^1 is everything that exists before any stage acts: the user, what the system
observes of the session, the user's recent history, and every stage's predictions for the whole pool. CIC
stores only tau^1 and rebuilds tau^2..tau^N by running the cascade (unexrl/rl/cic.py).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor
from torchrec import KeyedJaggedTensor

from unexrl.config import Config
from unexrl.sim.env import Observation
from unexrl.sim.world import World
from unexrl.user_features import input_dim

SPARSE_FEATURES = ("user_id", "recent_items", "recent_categories")
"""Sparse inputs of every actor and critic, in the fixed order their embeddings are concatenated."""

STATE_FEATURES = ("step", "log_items_watched", "log_watch_time", "last_watch_fraction")
"""Observable session state, followed by a one-hot of the activity group and (``algo.user_features``) the user's
behaviour features (unexrl.user_features.user_inputs)."""


def state_dim(cfg: Config) -> int:
    """Width of Tau1.state: STATE_FEATURES, the activity-group one-hot, and the user features if enabled."""
    return len(STATE_FEATURES) + len(cfg.world.user_types) + (input_dim(cfg) if cfg.algo.user_features else 0)


@dataclass(frozen=True)
class Tau1:
    """A batch of first-stage observations."""

    user: Tensor
    """[B] user ids"""
    activity_group: Tensor
    """[B] observable activity group (also the CQR user group G_u)"""
    state: Tensor
    """[B, state_dim] observable state: STATE_FEATURES, activity-group one-hot, user features if enabled"""
    history_items: Tensor
    """[B, W] recently watched item ids, -1 padded"""
    history_categories: Tensor
    """[B, W] their categories, -1 padded"""
    predictions: tuple[Tensor, ...]
    """per stage, [B, P, d_i] predictions for the whole pool (float32, float16-exact)"""

    def index(self, idx: Tensor) -> Tau1:
        """Rows ``idx`` of every field."""
        return Tau1(**{f.name: _take(getattr(self, f.name), idx) for f in fields(self)})

    def to(self, device: torch.device | str) -> Tau1:
        return Tau1(**{f.name: _move(getattr(self, f.name), device) for f in fields(self)})


def _take(value: Tensor | tuple[Tensor, ...], idx: Tensor) -> Tensor | tuple[Tensor, ...]:
    return tuple(v[idx] for v in value) if isinstance(value, tuple) else value[idx]


def _move(value: Tensor | tuple[Tensor, ...], device: torch.device | str) -> Tensor | tuple[Tensor, ...]:
    return tuple(v.to(device) for v in value) if isinstance(value, tuple) else value.to(device)


def session_state(
    step: Tensor,
    items_watched: Tensor,
    watch_time: Tensor,
    last_watch_fraction: Tensor,
    activity_group: Tensor,
    max_requests: int,
    n_groups: int,
) -> Tensor:
    """[B, 4 + n_groups] scaled session state; the same function serves the simulator, logs and serving."""
    return torch.cat(
        [
            torch.stack(
                [
                    step.float() / max_requests,
                    torch.log1p(items_watched.float()) / 5.0,
                    torch.log1p(watch_time.float()) / 8.0,
                    last_watch_fraction.float(),
                ],
                dim=1,
            ),
            torch.nn.functional.one_hot(activity_group.long(), n_groups).float(),
        ],
        dim=1,
    )


def model_state(session: Tensor, user_features: Tensor, cfg: Config) -> Tensor:
    """Tau1.state from :func:`session_state` and the user features: one place decides what the model sees."""
    return torch.cat([session, user_features], dim=1) if cfg.algo.user_features else session


def tau1_from_observation(obs: Observation, world: World, cfg: Config) -> Tau1:
    """tau^1 of a simulator observation (drops the oracle-only hidden type)."""
    hist = obs.history_items
    session = session_state(
        obs.step,
        obs.items_watched,
        obs.watch_time,
        obs.last_watch_fraction,
        obs.activity_group,
        cfg.session.max_requests,
        len(cfg.world.user_types),
    )
    return Tau1(
        user=obs.user,
        activity_group=obs.activity_group,
        state=model_state(session, obs.user_features, cfg),
        history_items=hist,
        history_categories=torch.where(hist >= 0, world.item_category[hist.clamp_min(0)], -1),
        predictions=obs.predictions,
    )


def sparse_features(*taus: Tau1) -> KeyedJaggedTensor:
    """The KeyedJaggedTensor of SPARSE_FEATURES: one user id, and the variable-length recent history.

    Several batches give one KJT of their rows in order, so one encoder pass embeds e.g. tau_t and tau_{t+1}
    (only the sparse fields are joined: the pool's predictions are the larger part of a Tau1 and no encoder reads
    them). A negative user id (a user outside the trained id space, served cold by unexrl/serve) contributes no
    id, so its user embedding pools to zero instead of reading another user's row.
    """
    user, items, categories = (
        torch.cat([getattr(t, name) for t in taus])
        for name in ("user", "history_items", "history_categories")
    )
    valid = items >= 0
    lengths = valid.sum(1)
    known = user >= 0
    return KeyedJaggedTensor.from_lengths_sync(
        keys=list(SPARSE_FEATURES),
        values=torch.cat([user[known], items[valid], categories[valid]]),
        lengths=torch.cat([known.long(), lengths, lengths]),
    )


def candidate_summary(predictions: Tensor) -> Tensor:
    """[B, n, d] -> [B, 3d]: per-head mean, std and max over the candidates (permutation-invariant).

    Computed once per stage view and shared by the actor and every critic that reads that view.
    """
    mean = predictions.mean(1)
    std = (
        (predictions - mean.unsqueeze(1)).square().mean(1).sqrt()
    )  # ~6x faster than std_mean at these shapes
    return torch.cat([mean, std, predictions.amax(1)], dim=1)
