"""Fixed fusion-weight policies: the production baseline (CEM), per-group oracles and reference policies.

A weight policy holds one concatenated action vector (a^1 | a^2 | ... | a^N) per group and looks up the row's
group at act time. ``group_by`` says what a group is:
  none            one vector for everyone (CEM, greedy)
  activity_group  the observable activity group
  oracle_type     the simulator's hidden behaviour type (oracle baselines only: not available in production)
  row             one vector per batch row as the rollout started (scoring a CEM population in one rollout)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from unexrl.cascade import StageView
from unexrl.config import CascadeConfig
from unexrl.sim.env import Observation
from unexrl.sim.hashing import hash_key, normal, uniform

GroupBy = Literal["none", "activity_group", "oracle_type", "row"]
_STREAM_EXPLORE = 53


def stage_slices(cascade: CascadeConfig) -> list[slice]:
    """Where each stage's action lives inside the concatenated weight vector."""
    out, start = [], 0
    for d in cascade.action_dims:
        out.append(slice(start, start + d))
        start += d
    return out


@dataclass
class WeightPolicy:
    """Fixed weights per group; ``weights`` is [G, sum(d_i)]."""

    weights: Tensor
    cascade: CascadeConfig
    group_by: GroupBy = "none"

    def __post_init__(self) -> None:
        total = sum(self.cascade.action_dims)
        if self.weights.ndim != 2 or self.weights.shape[1] != total:
            raise ValueError(f"weights must be [groups, {total}], got {tuple(self.weights.shape)}")
        self._slices = stage_slices(self.cascade)

    def group(self, obs: Observation) -> Tensor:
        if self.group_by == "none":
            return torch.zeros_like(obs.user)
        if self.group_by == "activity_group":
            return obs.activity_group
        if self.group_by == "oracle_type":
            return obs.oracle_type
        return obs.row

    def act(self, obs: Observation, view: StageView) -> Tensor:
        return self.weights[self.group(obs), self._slices[view.stage]]


@dataclass
class RandomPolicy:
    """Uniform random weights in the action box, drawn afresh per request and stage (keyed, reproducible)."""

    cascade: CascadeConfig
    seed: int = 0

    def act(self, obs: Observation, view: StageView) -> Tensor:
        d = self.cascade.action_dims[view.stage]
        head = torch.arange(d, device=obs.user.device)
        u = uniform(
            hash_key(self.seed, _STREAM_EXPLORE, view.stage, obs.session[:, None], obs.step[:, None], head)
        )
        return self.cascade.action_low + (self.cascade.action_high - self.cascade.action_low) * u


@dataclass
class GaussianExploration:
    """Behaviour policy for logging: the base policy's action plus keyed Gaussian noise, clipped to the box."""

    base: WeightPolicy
    std: float
    seed: int = 0

    def act(self, obs: Observation, view: StageView) -> Tensor:
        a = self.base.act(obs, view)
        if self.std == 0:
            return a
        head = torch.arange(a.shape[1], device=a.device)
        eps = normal(
            hash_key(
                self.seed, _STREAM_EXPLORE + 1, view.stage, obs.session[:, None], obs.step[:, None], head
            )
        )
        c = self.base.cascade
        return (a + self.std * eps).clamp(c.action_low, c.action_high)


def greedy_weights(cascade: CascadeConfig) -> Tensor:
    """[1, sum d] weights that maximise predicted immediate watch time at every stage.

    A stage with an expected-watch head weighs only it; a stage without one (matching) ranks by predicted
    affinity and longer duration (log watch time = log fraction + log duration).
    """
    parts = []
    for stage in cascade.stages:
        w = torch.zeros(len(stage.heads))
        if "expected_watch" in stage.heads:
            w[stage.heads.index("expected_watch")] = 1.0
        else:
            if "affinity" in stage.heads:
                w[stage.heads.index("affinity")] = 1.0
            if "shortness" in stage.heads:
                w[stage.heads.index("shortness")] = -0.5
        parts.append(w * cascade.action_high)
    return torch.cat(parts).unsqueeze(0)
