"""Replay buffer of transitions (tau^1_t, a^{1:N}_t, r_t, done_t, tau^1_{t+1}).

CIC needs only tau^1 (including every stage's predictions for the whole pool) and the logged actions; the next
observation is the row ``next_index`` (the same session's next request), so each tau^1 is stored once.
Per-item feedback is kept so the reward can be computed raw or CQR-rescaled at sampling time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from unexrl.config import Config
from unexrl.data.reader import LoggedData, cascade_inputs, list_matrix
from unexrl.rl.cqr import duration_bucket, training_reward
from unexrl.rl.observation import (
    Tau1,
    candidate_summary,
    model_state,
    session_state,
    state_dim,
    tau1_from_observation,
)
from unexrl.sim.env import Step
from unexrl.sim.world import World
from unexrl.user_features import COLUMNS, user_inputs


@dataclass(frozen=True)
class Batch:
    tau: Tau1
    actions: tuple[Tensor, ...]
    """logged a^{1:N}, each [B, d_i]"""
    reward: Tensor
    """[B] training reward (CQR-rescaled or scaled raw watch time)"""
    done: Tensor
    """[B] float, 1 where the session ended"""
    next_tau: Tau1
    next_actions: tuple[Tensor, ...]
    """the next request's logged actions (CTDE's downstream observations); arbitrary where done"""
    first_summary: Tensor
    """[B, 3 d_1] the whole pool's candidate summary of tau (stage 1's view, which no action changes)"""
    next_first_summary: Tensor
    """[B, 3 d_1] the same for next_tau"""

    def to(self, device: torch.device) -> Batch:
        """The batch on ``device`` (the replay buffer lives in host memory)."""
        if device.type == "cpu":
            return self
        move = lambda x: x.to(device)
        return Batch(
            tau=self.tau.to(device),
            actions=tuple(map(move, self.actions)),
            reward=move(self.reward),
            done=move(self.done),
            next_tau=self.next_tau.to(device),
            next_actions=tuple(map(move, self.next_actions)),
            first_summary=move(self.first_summary),
            next_first_summary=move(self.next_first_summary),
        )


class ReplayBuffer:
    """A ring buffer; whole sessions are added at once, so a stored transition's next row is always present."""

    def __init__(self, cfg: Config, capacity: int) -> None:
        c = cfg.cascade
        w = cfg.session.history_window
        self.cfg, self.capacity = cfg, capacity
        self.user = torch.zeros(capacity, dtype=torch.long)
        self.activity_group = torch.zeros(capacity, dtype=torch.long)
        self.state = torch.zeros(capacity, state_dim(cfg))
        self.history_items = torch.zeros(capacity, w, dtype=torch.long)
        self.history_categories = torch.zeros(capacity, w, dtype=torch.long)
        self.predictions = [torch.zeros(capacity, c.pool_size, d, dtype=torch.float16) for d in c.action_dims]
        self.first_summary = torch.zeros(capacity, 3 * c.action_dims[0])
        self.actions = [torch.zeros(capacity, d) for d in c.action_dims]
        self.watch_time = torch.zeros(capacity, c.page_size)
        self.viewed = torch.zeros(capacity, c.page_size, dtype=torch.bool)
        self.item_group = torch.zeros(capacity, c.page_size, dtype=torch.long)
        self.done = torch.zeros(capacity, dtype=torch.bool)
        self.next_index = torch.zeros(capacity, dtype=torch.long)
        self.rewards = torch.zeros(capacity)
        """each row's training reward, kept current with the knots (sampling reads it n times per transition)"""
        self.size = 0
        self._cursor = 0
        self.cqr_knots: Tensor | None = None

    def add_steps(self, steps: Sequence[Step], world: World) -> int:
        """Add every active row of one finished batch of sessions (``steps`` of one rollout batch, in order)."""
        cfg = self.cfg
        rows = [torch.nonzero(s.active, as_tuple=True)[0] for s in steps]
        # position of (step t, session row b as the rollout started) among the rows added: links a transition to its
        # next request (the rollout drops finished sessions, so batch positions move between steps; Observation.row not)
        position = torch.full((len(steps) + 1, steps[0].active.shape[0]), -1, dtype=torch.long)
        started = [s.obs.row[r].cpu() for s, r in zip(steps, rows)]
        offset = 0
        for t, b in enumerate(started):
            position[t, b] = offset + torch.arange(len(b))
            offset += len(b)
        fields: dict[str, list[Tensor]] = {}
        next_row = []
        for t, (s, r) in enumerate(zip(steps, rows)):
            tau = tau1_from_observation(s.obs, world, cfg).index(r)
            page = s.page_items[r]
            for name, value in (
                ("user", tau.user),
                ("activity_group", tau.activity_group),
                ("state", tau.state),
                ("history_items", tau.history_items),
                ("history_categories", tau.history_categories),
                ("watch_time", s.response.watch_time[r]),
                ("viewed", s.response.viewed[r]),
                (
                    "item_group",
                    duration_bucket(world.item_duration[page], cfg.features.duration_bucket_edges_s),
                ),
                ("done", s.done[r]),
                *((f"predictions{i}", p) for i, p in enumerate(tau.predictions)),
                *((f"actions{i}", a[r].detach()) for i, a in enumerate(s.cascade.actions)),
            ):
                fields.setdefault(name, []).append(value.cpu())
            here, after = position[t, started[t]], position[t + 1, started[t]]
            next_row.append(torch.where(s.done[r].cpu() | (after < 0), here, after))
        return self._append({k: torch.cat(v) for k, v in fields.items()}, torch.cat(next_row))

    def add_logs(self, data: LoggedData, features: pa.Table | None = None) -> int:
        """Add every transition of a validated log directory (the offline regime).

        ``features``: the logs' point-in-time training set (verified against them: unexrl/features/training_set.py),
        whose user columns become the model's user features; required when ``algo.user_features`` is on.
        """
        cfg = self.cfg
        t = data.transitions
        n = t.num_rows
        user = torch.tensor(t["user_id"].to_numpy())
        group_of = torch.tensor(data.users["activity_group"].to_numpy().astype(np.int64))
        category_of = torch.tensor(data.items["category"].to_numpy().astype(np.int64))
        duration_of = torch.tensor(data.items["duration_s"].to_numpy())
        group = group_of[user]  # user and item ids are row positions: the reader checked they are 0..n-1
        column = lambda name: torch.tensor(t[name].to_numpy())
        history = _pad_left(t["history_item_ids"], cfg.session.history_window)
        preds, actions, _ = cascade_inputs(t, cfg)
        shown = torch.tensor(list_matrix(t, "shown_item_ids", cfg.cascade.page_size))
        request = t["request_id"].to_numpy()
        next_request = t["next_request_id"].fill_null(-1).to_numpy()
        order = np.argsort(request)
        found = order[np.searchsorted(request, next_request, sorter=order).clip(0, n - 1)]
        has_next = (next_request >= 0) & (request[found] == next_request)
        next_row = torch.from_numpy(np.where(has_next, found, np.arange(n)))
        session = session_state(
            column("step"),
            column("session_items_watched"),
            column("session_watch_time_s"),
            column("last_watch_fraction"),
            group,
            cfg.session.max_requests,
            len(cfg.world.user_types),
        )
        fields = {
            "user": user,
            "activity_group": group,
            "state": model_state(session, _logged_user_features(t, features, cfg), cfg),
            "history_items": history,
            "history_categories": torch.where(history >= 0, category_of[history.clamp_min(0)], -1),
            "watch_time": torch.tensor(list_matrix(t, "watch_time_s", cfg.cascade.page_size)),
            "viewed": torch.tensor(list_matrix(t, "viewed", cfg.cascade.page_size)),
            "item_group": duration_bucket(duration_of[shown], cfg.features.duration_bucket_edges_s),
            "done": column("done"),
            **{f"predictions{i}": p for i, p in enumerate(preds)},
            **{f"actions{i}": a for i, a in enumerate(actions)},
        }
        return self._append(fields, next_row)

    def _append(self, fields: dict[str, Tensor], next_row: Tensor) -> int:
        """Store n transitions; ``next_row[k]`` is the position (0..n-1) of row k's next request (itself if done)."""
        n = int(next_row.shape[0])
        if n > self.capacity:
            raise ValueError(f"{n} transitions do not fit a buffer of {self.capacity} (train.buffer_size)")
        slots = (self._cursor + torch.arange(n)) % self.capacity
        for name, value in fields.items():
            if name.startswith("predictions"):
                self.predictions[int(name.removeprefix("predictions"))][slots] = value.half()
                if name == "predictions0":  # from the stored (float16) values, as sampling will see them
                    self.first_summary[slots] = candidate_summary(value.half().float())
            elif name.startswith("actions"):
                self.actions[int(name.removeprefix("actions"))][slots] = value.float()
            else:
                getattr(self, name)[slots] = value.to(getattr(self, name).dtype)
        self.next_index[slots] = slots[next_row]
        self.rewards[slots] = self._training_reward(slots)
        self._cursor = (self._cursor + n) % self.capacity
        self.size = min(self.size + n, self.capacity)
        return n

    def set_knots(self, knots: Tensor | None) -> None:
        """Train on CQR with ``knots`` from now on (None: raw watch time); every stored reward is rescaled."""
        self.cqr_knots = knots
        self.rewards[: self.size] = self._training_reward(torch.arange(self.size))

    def cqr_samples(self) -> tuple[Tensor, Tensor, Tensor]:
        """(watch time, user group, item group) of every unit stored, what CQR's knots are fitted on: every
        request's page watch time (``features.cqr_unit=page``), or every viewed item's watch time (``item``)."""
        n = self.size
        viewed = self.viewed[:n]
        if self.cfg.features.cqr_unit == "page":
            group = self.activity_group[:n]
            return (self.watch_time[:n] * viewed).sum(1), group, torch.zeros_like(group)
        groups = self.activity_group[:n, None].expand_as(viewed)
        return self.watch_time[:n][viewed], groups[viewed], self.item_group[:n][viewed]

    def reward(self, idx: Tensor) -> Tensor:
        """Training reward of rows ``idx`` (unexrl.rl.cqr.training_reward with this buffer's knots)."""
        return self.rewards[idx]

    def _training_reward(self, idx: Tensor) -> Tensor:
        return training_reward(
            self.watch_time[idx],
            self.viewed[idx],
            self.activity_group[idx],
            self.item_group[idx],
            self.cqr_knots,
            self.cfg,
        )

    def tau(self, idx: Tensor) -> Tau1:
        rows = lambda x: x.index_select(0, idx)
        return Tau1(
            user=rows(self.user),
            activity_group=rows(self.activity_group),
            state=rows(self.state),
            history_items=rows(self.history_items),
            history_categories=rows(self.history_categories),
            predictions=tuple(rows(p).float() for p in self.predictions),
        )

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        """``batch_size`` transitions drawn uniformly with replacement."""
        return self.batch(torch.randint(0, self.size, (batch_size,), generator=generator))

    def batch(self, idx: Tensor) -> Batch:
        """The transitions at rows ``idx``, each with the request ``algo.n_step`` ahead in its session.

        reward: sum_{k<n} gamma^k r~_{t+k}, stopping at the session's end; done: the session ended within n;
        next_*: the request n ahead (where the session ended: its last request, which done masks out).
        """
        gamma = self.cfg.algo.gamma
        reward = torch.zeros(idx.shape[0])
        alive = torch.ones(idx.shape[0])
        row = idx
        for k in range(self.cfg.algo.n_step):
            reward += alive * gamma**k * self.rewards.index_select(0, row)
            alive = alive * (~self.done.index_select(0, row)).float()
            if k + 1 < self.cfg.algo.n_step:
                row = torch.where(alive > 0, self.next_index.index_select(0, row), row)
        nxt = self.next_index.index_select(0, row)
        return Batch(
            tau=self.tau(idx),
            actions=tuple(a.index_select(0, idx) for a in self.actions),
            reward=reward,
            done=1.0 - alive,
            next_tau=self.tau(nxt),
            next_actions=tuple(a.index_select(0, nxt) for a in self.actions),
            first_summary=self.first_summary.index_select(0, idx),
            next_first_summary=self.first_summary.index_select(0, nxt),
        )


def _logged_user_features(transitions: pa.Table, features: pa.Table | None, cfg: Config) -> Tensor:
    """The user features of each logged request, in the transitions' order, from the training set's rows."""
    if not cfg.algo.user_features:
        return torch.zeros(transitions.num_rows, 0)
    if features is None:
        raise ValueError(
            "algo.user_features: offline training reads the user features from the logs' point-in-time training "
            "set: give --training-set (unexrl features training-set), or set algo.user_features=false"
        )
    request = transitions["request_id"].to_numpy()
    order = np.argsort(features["request_id"].to_numpy(), kind="stable")
    at = order[np.searchsorted(features["request_id"].to_numpy(), request, sorter=order)]
    return user_inputs({name: features[name].combine_chunks().take(at) for name in COLUMNS}, cfg)


def _pad_left(column: pa.ChunkedArray, width: int) -> Tensor:
    """A list<int64> column of recent ids (oldest first, at most ``width``) as [rows, width], -1 padded on the left
    like the simulator's history window."""
    arr = column.combine_chunks()
    lengths = arr.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)
    values = arr.flatten().to_numpy(zero_copy_only=False)
    out = np.full((len(lengths), width), -1, dtype=np.int64)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    out[rows, width - lengths[rows] + (np.arange(len(values)) - starts)] = values
    return torch.from_numpy(out)
