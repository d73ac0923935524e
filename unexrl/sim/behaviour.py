"""The user_behaviour feature view, maintained per user as a rollout runs: online training's feature rows.

``unexrl features build`` computes user_behaviour from logs (unexrl/features/build.py); this keeps the same
aggregates with the same definitions while sessions are simulated, so the actors see the same row in online
training and evaluation as offline (the training set) and at serving (the online store). A request sees its
user's earlier sessions and its own session's earlier pages, as a point-in-time join at the request's timestamp
does (a page counts once its feedback is complete, before the session's next request).

Serving reads these rows too: a session's record keeps its user's totals from the store's row at its start and
adds each answered page (unexrl/serve/behaviour.py). With ``within_session=False`` a request sees only its user's
earlier sessions: the online store's row read at every request, as serving did before, materialised just before
each batch (benchmarks/cpu/feature_skew.py measures what that cost; docs/features.md).

One :class:`UserBehaviour` spans one rollout, starting with no history unless the rollout is given one that
earlier sessions filled (a burn-in). The rollout steps a batch's sessions in
lockstep, not in log time, so the sessions of one batch are taken as concurrent: a request sees the histories of
its user's sessions in earlier batches (joined in session order, which is their log order) and its own session's
earlier pages, never another session of the same batch. A request whose user has no other session in its batch
gets the build's row up to float rounding (tests/test_user_features.py); a later session of a user who has one
misses the earlier one's pages, which the log's timestamps would have shown it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from unexrl.config import Config
from unexrl.sim.world import World
from unexrl.user_features import SHARE, VIEW, behaviour_defaults

PREFIX = f"{VIEW}__"


@dataclass
class Totals:
    """Running sums of answered pages, one row per key (a user, or a session's row in its batch)."""

    requests: Tensor
    sessions: Tensor
    items_viewed: Tensor
    clicks: Tensor
    likes: Tensor
    watch: Tensor
    fraction: Tensor
    viewed_duration: Tensor
    category_watch: Tensor
    """[n, n_categories] seconds watched per category"""
    recent: Tensor
    """[n, recent_items] the last viewed items' watch fractions, oldest first, right-aligned (zeros before)"""
    recent_count: Tensor
    """viewed items ever added to ``recent`` (its valid slots: the last min(count, recent_items))"""

    @staticmethod
    def zeros(n: int, cfg: Config, device: torch.device) -> Totals:
        long = lambda: torch.zeros(n, dtype=torch.long, device=device)
        real = lambda *width: torch.zeros(n, *width, dtype=torch.float64, device=device)
        return Totals(
            requests=long(),
            sessions=long(),
            items_viewed=long(),
            clicks=long(),
            likes=long(),
            watch=real(),
            fraction=real(),
            viewed_duration=real(),
            category_watch=real(cfg.world.n_categories),
            recent=real(cfg.features.recent_items),
            recent_count=long(),
        )

    @staticmethod
    def of_pages(
        world: World,
        window: int,
        first_request: Tensor,
        page: Tensor,
        watch_time: Tensor,
        viewed: Tensor,
        click: Tensor,
        like: Tensor,
    ) -> Totals:
        """One row per answered page ([B, K] items and outcomes; the viewed items are a prefix of the page)."""
        watch = watch_time.double() * viewed
        duration = world.item_duration[page].double()
        fraction = watch / duration
        n_viewed = viewed.sum(1)
        category_watch = torch.zeros(
            page.shape[0], world.n_categories, dtype=torch.float64, device=page.device
        )
        category_watch.scatter_add_(1, world.item_category[page], watch)
        padded = torch.cat(
            [torch.zeros(page.shape[0], window, dtype=torch.float64, device=page.device), fraction], 1
        )
        return Totals(
            requests=torch.ones_like(n_viewed),
            sessions=first_request.long(),
            items_viewed=n_viewed,
            clicks=(click & viewed).sum(1),
            likes=(like & viewed).sum(1),
            watch=watch.sum(1),
            fraction=fraction.sum(1),
            viewed_duration=(duration * viewed).sum(1),
            category_watch=category_watch,
            recent=padded.gather(1, torch.arange(window, device=page.device)[None, :] + n_viewed[:, None]),
            recent_count=n_viewed,
        )

    @staticmethod
    def of_row(row: Mapping[str, Any], cfg: Config) -> Totals:
        """One user's totals from a user_behaviour row (full names, as the online store serves it; a missing or
        null value takes its default): each sum is its mean times the views, exact but for float32 rounding."""
        d, window = behaviour_defaults(cfg), cfg.features.recent_items

        def value(name: str) -> Any:
            v = row.get(PREFIX + name)
            return d[name] if v is None or (isinstance(v, float) and math.isnan(v)) else v

        views = int(value("items_viewed"))
        watch = float(value("watch_time_s"))
        share = [float(x) for x in value(SHARE)]
        if len(share) != cfg.world.n_categories:
            raise ValueError(
                f"{PREFIX}{SHARE}: {len(share)} values, not n_categories={cfg.world.n_categories}"
            )
        recent = [float(x) for x in value("recent_watch_fractions")][-window:]

        def one(x: Any, dtype: torch.dtype) -> Tensor:
            return torch.tensor([x], dtype=dtype)

        def total(mean: str, dtype: torch.dtype = torch.float64) -> Tensor:
            product = float(value(mean)) * views
            return one(round(product) if dtype == torch.long else product, dtype)

        return Totals(
            requests=one(int(value("requests")), torch.long),
            sessions=one(int(value("sessions")), torch.long),
            items_viewed=one(views, torch.long),
            clicks=total("click_rate", torch.long),
            likes=total("like_rate", torch.long),
            watch=one(watch, torch.float64),
            fraction=total("mean_watch_fraction"),
            viewed_duration=total("mean_viewed_duration_s"),
            category_watch=one([x * watch for x in share], torch.float64),
            recent=one([0.0] * (window - len(recent)) + recent, torch.float64),
            recent_count=one(len(recent), torch.long),  # only min(count, window) is ever read
        )

    def take(self, index: Tensor) -> Totals:
        return Totals(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def then(self, later: Totals) -> Totals:
        """Row-wise: these totals followed by ``later``'s pages (sums add; the recent window shifts)."""
        window = self.recent.shape[1]
        m = later.recent_count.clamp_max(window)[:, None]
        slot = torch.arange(window, device=m.device)[None, :]
        recent = torch.where(
            slot >= window - m, later.recent, self.recent.gather(1, (slot + m).clamp_max(window - 1))
        )
        out = {f.name: getattr(self, f.name) + getattr(later, f.name) for f in fields(self)}
        return Totals(**(out | {"recent": recent}))

    def add(self, index: Tensor, later: Totals) -> None:
        """Rows ``index`` followed by ``later``'s rows, in order (an index may repeat: one occurrence at a time)."""
        occurrence = _occurrence(index)
        for k in range(int(occurrence.max()) + 1 if index.numel() else 0):
            rows = torch.nonzero(occurrence == k, as_tuple=True)[0]
            updated = self.take(index[rows]).then(later.take(rows))
            for f in fields(self):
                getattr(self, f.name)[index[rows]] = getattr(updated, f.name)

    def features(self, cfg: Config) -> dict[str, Tensor]:
        """The user_behaviour rows these totals make (the columns the model's input reads, full names)."""
        d, window = behaviour_defaults(cfg), cfg.features.recent_items
        views = self.items_viewed
        seen = views > 0

        def mean(total: Tensor, name: str) -> Tensor:
            return torch.where(seen, total / views.clamp_min(1), d[name]).float()

        share = torch.where(
            self.watch[:, None] > 0,
            self.category_watch / self.watch.clamp_min(1e-12)[:, None],
            1.0 / cfg.world.n_categories,
        )
        length = self.recent_count.clamp_max(window)
        slot = torch.arange(window, device=views.device)[None, :]
        recent_sum = torch.where(slot >= window - length[:, None], self.recent, 0.0).sum(1)
        values = {
            "requests": self.requests,
            "sessions": self.sessions,
            "items_viewed": views,
            "watch_time_s": self.watch.float(),
            "mean_watch_time_s": mean(self.watch, "mean_watch_time_s"),
            "mean_watch_fraction": mean(self.fraction, "mean_watch_fraction"),
            "mean_viewed_duration_s": mean(self.viewed_duration, "mean_viewed_duration_s"),
            "click_rate": mean(self.clicks.double(), "click_rate"),
            "like_rate": mean(self.likes.double(), "like_rate"),
            "recent_watch_fraction": torch.where(
                length > 0, recent_sum / length.clamp_min(1), d["recent_watch_fraction"]
            ).float(),
            SHARE: share.float(),
        }
        return {PREFIX + name: value for name, value in values.items()}


class UserBehaviour:
    """One rollout's user histories: the pages of every session of its earlier batches, per user."""

    def __init__(self, cfg: Config, world: World, within_session: bool = True) -> None:
        """``within_session``: a request sees its own session's earlier pages, as the logs' point-in-time rows,
        online training and serving do; False: only its user's sessions of earlier batches, the store's row alone
        (the within-session skew serving had, docs/features.md)."""
        self.cfg, self.world, self.within_session = cfg, world, within_session
        self.users = Totals.zeros(world.n_users, cfg, world.item_category.device)
        self._ended: list[tuple[Tensor, Tensor, Totals]] = []

    def copy(self, within_session: bool) -> UserBehaviour:
        """The same histories, read with ``within_session``: one burn-in, rolled on from in several ways."""
        out = UserBehaviour(self.cfg, self.world, within_session)
        out.users = self.users.take(torch.arange(self.world.n_users, device=self.users.requests.device))
        out._ended = list(self._ended)  # never modified in place
        return out

    def new_sessions(self, n: int) -> Totals:
        """A new batch of ``n`` sessions: the last batch's sessions join the histories; their empty totals."""
        if self._ended:
            session, user, totals = (list(x) for x in zip(*self._ended))
            order = torch.argsort(torch.cat(session))
            joined = Totals(
                **{f.name: torch.cat([getattr(t, f.name) for t in totals]) for f in fields(Totals)}
            )
            self.users.add(torch.cat(user)[order], joined.take(order))
            self._ended.clear()
        return Totals.zeros(n, self.cfg, self.world.item_category.device)

    def end_sessions(self, session: Tensor, user: Tensor, totals: Totals) -> None:
        """Sessions that ended: their pages join their users' histories when the next batch starts."""
        if session.numel():
            self._ended.append((session, user, totals))

    def rows(self, user: Tensor, session: Totals) -> dict[str, Tensor]:
        """user_behaviour as of now for requests of ``user`` in sessions with running ``session`` totals."""
        t = self.users.take(user).then(session) if self.within_session else self.users.take(user)
        return t.features(self.cfg)


def _occurrence(values: Tensor) -> Tensor:
    """For each position, how many earlier positions hold the same value (0 for a value's first occurrence)."""
    order = torch.argsort(values, stable=True)
    sorted_values = values[order]
    start = torch.ones_like(sorted_values, dtype=torch.bool)
    start[1:] = sorted_values[1:] != sorted_values[:-1]
    positions = torch.arange(len(values), device=values.device)
    first = torch.cummax(torch.where(start, positions, 0), 0).values
    out = torch.empty_like(values)
    out[order] = positions - first
    return out
