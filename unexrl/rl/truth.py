"""The simulator's true gradient of session watch time with respect to a policy's fusion weights, per user group.

A critic is useful to an actor only if its action gradient points where the return rises. The simulator can say
where that is: roll the same sessions out with every weight nudged up and down (common random numbers: the same
seed and session ids, so users, pools and responses are the same draws), and difference the mean session watch
time of each observable activity group:

    g_{g,k} = (J_g(w + delta e_k) - J_g(w - delta e_k)) / (2 delta)

One rollout serves every group at once, since a session only ever sees its own user's actions. The nudge is added
to whatever the policy acts (CEM's fixed weights or an actor's output), not clipped to the action box: it is the
gradient of the return, not of a constrained policy. The same rollouts also give the gradient of the discounted
training return (CQR, gamma) when a per-request training reward is given: whether the reward the critic learns has
its optimum where watch time has it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from unexrl.cascade import StageView
from unexrl.evaluate.rollout import rollout
from unexrl.policies.weights import stage_slices
from unexrl.sim.env import Observation, Policy, Simulator, Step


class OffsetPolicy:
    """``base`` with a fixed offset added to each batch row's concatenated action (a^1 | ... | a^N)."""

    def __init__(self, base: Policy, offsets: Tensor, slices: list[slice]) -> None:
        self.base, self.offsets, self.slices = base, offsets, slices

    def act(self, obs: Observation, view: StageView) -> Tensor:
        return self.base.act(obs, view) + self.offsets[obs.row, self.slices[view.stage]]


@dataclass(frozen=True)
class TrueGradient:
    gradient: np.ndarray
    """[groups, sum d_i] seconds of mean session watch time per unit weight, per activity group"""
    split_half_cosine: np.ndarray
    """[groups] cosine between the estimates from the two halves of the sessions: how repeatable the truth is"""
    training_gradient: np.ndarray | None
    """[groups, sum d_i] the same for the session's discounted training return (None: no training reward given)"""
    sessions: int
    delta: float


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of two vectors (0 when either is zero)."""
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / norm) if norm > 0 else 0.0


@torch.no_grad()
def true_gradient(
    sim: Simulator,
    policy: Policy,
    seed: int,
    session_ids: Tensor,
    delta: float,
    batch_rows: int,
    training_reward: Callable[[Step], Tensor] | None = None,
) -> TrueGradient:
    """Central differences of per-group mean session watch time, +-``delta`` on every weight, on ``session_ids``.

    ``batch_rows``: rows per batched rollout; each batch holds whole blocks of the sessions under one nudge each.
    ``training_reward``: a request's discounted training reward from its Step ([B]); its session sums are
    differenced the same way.
    """
    cascade = sim.cfg.cascade
    dims = sum(cascade.action_dims)
    n = int(session_ids.numel())
    device = sim.world.item_category.device
    nudges = torch.cat([torch.eye(dims), -torch.eye(dims)]) * delta  # [2D, D]: +e_k then -e_k
    per_batch = max(1, batch_rows // n)
    groups = sim.world.user_activity_group[sim.start(seed, session_ids).user].cpu().numpy()
    n_groups = len(sim.cfg.world.user_types)
    watch = np.zeros((len(nudges), n))
    training = np.zeros((len(nudges), n))
    for start in range(0, len(nudges), per_batch):
        block = nudges[start : start + per_batch]
        offsets = block.repeat_interleave(n, dim=0).to(device)
        ids = session_ids.repeat(len(block))
        total = torch.zeros(len(ids), device=device)

        def add(step: Step, total: Tensor = total) -> None:
            if training_reward is not None:
                total.index_add_(0, step.obs.row, torch.where(step.active, training_reward(step), 0.0))

        out = rollout(
            sim,
            OffsetPolicy(policy, offsets, stage_slices(cascade)),
            seed,
            ids,
            batch_size=len(ids),
            on_step=add,
        )
        watch[start : start + len(block)] = out.watch_time.reshape(len(block), n)
        training[start : start + len(block)] = total.cpu().numpy().reshape(len(block), n)

    def per_group(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        diff = (values[:dims] - values[dims:]) / (2 * delta)  # [D, sessions]: per-session CRN differences
        halves = np.arange(n) % 2
        gradient, split = np.zeros((n_groups, dims)), np.zeros(n_groups)
        for g in range(n_groups):
            mine = groups == g
            gradient[g] = diff[:, mine].mean(1) if mine.any() else 0.0
            a, b = (diff[:, mine & (halves == h)] for h in (0, 1))
            split[g] = cosine(a.mean(1), b.mean(1)) if a.size and b.size else 0.0
        return gradient, split

    gradient, split = per_group(watch)
    return TrueGradient(
        gradient=gradient,
        split_half_cosine=split,
        training_gradient=per_group(training)[0] if training_reward is not None else None,
        sessions=n,
        delta=delta,
    )
