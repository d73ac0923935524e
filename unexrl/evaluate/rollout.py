"""Roll a policy out over whole sessions and collect per-session outcomes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from unexrl.sim.behaviour import UserBehaviour
from unexrl.sim.env import Policy, SessionBatch, Simulator, Step


@dataclass(frozen=True)
class SessionOutcomes:
    """One entry per session of a rollout."""

    seed: int
    user: np.ndarray
    """user id of each session"""
    watch_time: np.ndarray
    """total watch time of each session, seconds"""
    items: np.ndarray
    """items viewed in each session (session length)"""
    requests: np.ndarray
    """requests served in each session"""

    @staticmethod
    def concat(parts: list[SessionOutcomes]) -> SessionOutcomes:
        return SessionOutcomes(
            seed=parts[0].seed,
            user=np.concatenate([p.user for p in parts]),
            watch_time=np.concatenate([p.watch_time for p in parts]),
            items=np.concatenate([p.items for p in parts]),
            requests=np.concatenate([p.requests for p in parts]),
        )


def _record(final: dict[str, torch.Tensor], done: SessionBatch) -> None:
    """Write finished sessions' outcomes at their rows as the batch started."""
    rows = done.row.cpu()
    final["watch_time"][rows] = done.watch_time.cpu().double()
    final["items"][rows] = done.items_watched.cpu().double()
    final["requests"][rows] = done.step.cpu().double()


COMPACT_BELOW = 0.75
"""a rollout drops its finished sessions once fewer than this share of the rows it steps are still alive"""


@torch.no_grad()
def rollout(
    sim: Simulator,
    policy: Policy,
    seed: int,
    sessions: int | torch.Tensor,
    batch_size: int,
    on_step: Callable[[Step], None] | None = None,
    progress: bool = False,
    behaviour: UserBehaviour | None = None,
) -> SessionOutcomes:
    """Simulate sessions of ``seed`` to their end: ids 0..sessions-1, or the given ids, ``batch_size`` at a time.

    Finished sessions are dropped from the batch as it goes (sessions last from one request to the cap, and
    stepping the finished ones cost most of a batch's time); ``Observation.row`` keeps each session's row as the
    batch started, which a policy with ``group_by="row"`` reads. Outcomes come back in session order. Users'
    behaviour features (Observation.user_features) accumulate over the rollout's pages, across its batches, in
    ``behaviour``: a fresh one (no history) by default; pass one to go on from an earlier rollout's histories (a
    burn-in) or to read them as the online store serves them (unexrl.sim.behaviour.UserBehaviour).
    """
    ids_all = torch.arange(sessions) if isinstance(sessions, int) else sessions
    behaviour = behaviour if behaviour is not None else UserBehaviour(sim.cfg, sim.world)
    parts = []
    chunks = range(0, ids_all.numel(), batch_size)
    for start in tqdm(chunks, desc=f"rollout seed {seed}", disable=not progress, leave=False):
        state = sim.start(seed, ids_all[start : start + batch_size], behaviour)
        n = state.user.shape[0]
        final = {name: torch.zeros(n, dtype=torch.float64) for name in ("watch_time", "items", "requests")}
        user = state.user.cpu().numpy()
        while bool(state.alive.any()):
            step = sim.step(state, policy)
            if on_step is not None:
                on_step(step)
            alive = state.alive
            if int(alive.sum()) < COMPACT_BELOW * alive.numel():
                _record(final, state.select(torch.nonzero(~alive).squeeze(1)))
                state = state.select(torch.nonzero(alive).squeeze(1))
        _record(final, state)
        parts.append(
            SessionOutcomes(
                seed=seed,
                user=user,
                watch_time=final["watch_time"].numpy(),
                items=final["items"].numpy().astype(np.float32),
                requests=final["requests"].numpy().astype(np.int64),
            )
        )
    return SessionOutcomes.concat(parts)
