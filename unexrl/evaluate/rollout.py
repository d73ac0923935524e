"""Roll a policy out over whole sessions and collect per-session outcomes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from unexrl.sim.env import Policy, Simulator, Step


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


@torch.no_grad()
def rollout(
    sim: Simulator,
    policy: Policy,
    seed: int,
    sessions: int | torch.Tensor,
    batch_size: int,
    on_step: Callable[[Step], None] | None = None,
    progress: bool = False,
) -> SessionOutcomes:
    """Simulate sessions of ``seed`` to their end: ids 0..sessions-1, or the given ids, ``batch_size`` at a time.

    Rows keep their place in a batch, so a policy with ``group_by="row"`` sees row i of each batch as row i.
    """
    ids_all = torch.arange(sessions) if isinstance(sessions, int) else sessions
    parts = []
    chunks = range(0, ids_all.numel(), batch_size)
    for start in tqdm(chunks, desc=f"rollout seed {seed}", disable=not progress, leave=False):
        state = sim.start(seed, ids_all[start : start + batch_size])
        while bool(state.alive.any()):
            step = sim.step(state, policy)
            if on_step is not None:
                on_step(step)
        parts.append(
            SessionOutcomes(
                seed=seed,
                user=state.user.cpu().numpy(),
                watch_time=state.watch_time.cpu().double().numpy(),
                items=state.items_watched.cpu().numpy(),
                requests=state.step.cpu().numpy(),
            )
        )
    return SessionOutcomes.concat(parts)
