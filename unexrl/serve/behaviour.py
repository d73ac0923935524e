"""The user_behaviour row a session's requests read: the store's row at the session's start, plus its own pages.

Training reads, at every request, the user's behaviour with the same session's pages answered so far (the
training set's point-in-time join; the simulator's running totals). The online store's row changes only when a
materialisation runs, a batch: read at every request, it would leave the session's own pages out from its second
page on (the skew docs/features.md measured). So a session carries its user's totals: the row its first request
read, each answered page added as its feedback arrives, with the simulator's arithmetic
(:class:`unexrl.sim.behaviour.Totals`). The row is read once per session: a materialisation during the session may
already hold some of its pages, which would then count twice.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, get_type_hints

import torch
from torch import Tensor

from unexrl.config import Config
from unexrl.sim.behaviour import Totals
from unexrl.sim.world import World
from unexrl.user_features import user_inputs


@dataclass(frozen=True)
class SessionBehaviour:
    """One user's :class:`Totals` as plain values, so a session record (JSON, in Redis too) can hold them."""

    requests: int
    sessions: int
    items_viewed: int
    clicks: int
    likes: int
    watch: float
    fraction: float
    viewed_duration: float
    category_watch: list[float]
    recent: list[float]
    recent_count: int

    @staticmethod
    def of_row(row: Mapping[str, Any], cfg: Config) -> SessionBehaviour:
        """The totals of the user's row as the store serves it (``OnlineFeatures.user``)."""
        return SessionBehaviour._of(Totals.of_row(row, cfg))

    def with_page(
        self,
        world: World,
        cfg: Config,
        *,
        first: bool,
        viewed: Sequence[int],
        watch_time_s: Sequence[float],
        click: Sequence[bool],
        like: Sequence[bool],
    ) -> SessionBehaviour:
        """These totals and one answered page: its viewed items in page order, with their outcomes; ``first``:
        the session's first answered page (it counts the session)."""
        items = torch.tensor([list(viewed)], dtype=torch.long)
        page = Totals.of_pages(
            world,
            cfg.features.recent_items,
            torch.tensor([first]),
            items,
            torch.tensor([list(watch_time_s)], dtype=torch.float64),
            torch.ones_like(items, dtype=torch.bool),
            torch.tensor([list(click)], dtype=torch.bool),
            torch.tensor([list(like)], dtype=torch.bool),
        )
        return SessionBehaviour._of(self._totals().then(page))

    def usable(self, cfg: Config) -> bool:
        """Whether these totals can be served under ``cfg``: of its shape (a record written by a deployment with
        other ``world.n_categories`` or ``features.recent_items`` that shares the session store is not), counts
        within int64 and every sum finite and not negative (a stored record is checked before it is used)."""
        counts = [v for f in fields(self) if isinstance(v := getattr(self, f.name), int)]
        sums = [self.watch, self.fraction, self.viewed_duration, *self.category_watch, *self.recent]
        return (
            len(self.category_watch) == cfg.world.n_categories
            and len(self.recent) == cfg.features.recent_items
            and all(0 <= v < 2**63 for v in counts)
            and all(math.isfinite(v) and v >= 0 for v in sums)
        )

    def inputs(self, cfg: Config) -> Tensor:
        """[1, input_dim] the model's user input of these totals, as of the row they would make."""
        return user_inputs(self._totals().features(cfg), cfg)

    @staticmethod
    def _of(t: Totals) -> SessionBehaviour:
        return SessionBehaviour(**{f.name: getattr(t, f.name)[0].tolist() for f in fields(Totals)})

    def _totals(self) -> Totals:
        return Totals(
            **{f.name: torch.tensor([getattr(self, f.name)], dtype=_DTYPES[f.name]) for f in fields(self)}
        )


_DTYPES = {
    name: torch.long if kind is int else torch.float64
    for name, kind in get_type_hints(SessionBehaviour).items()
}
"""counts as int64 and sums as float64, as Totals.zeros makes them"""
