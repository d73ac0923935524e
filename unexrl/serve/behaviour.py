"""The user_behaviour row a session's requests read: the store's row at the session's start, plus its own pages.

Training reads, at every request, the user's behaviour with the same session's pages answered so far (the
training set's point-in-time join; the simulator's running totals). A materialisation, a batch, cannot keep the
online store's row that fresh (the skew docs/features.md measured). So a session carries its user's totals: the
row its first request read, each answered page added as its feedback arrives, with the simulator's arithmetic
(:class:`unexrl.sim.behaviour.Totals`), in its own record, which a failed write to the feature store does not
lose. The row is read once per session: later it may already hold some of the session's pages, which would then
count twice.

Each feedback also pushes the totals back as the user's row (:meth:`SessionBehaviour.row`): the row a
materialisation of the logs up to that page would write, so the user's next session starts from this one's pages
without waiting for the next materialisation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, get_type_hints

import torch
from torch import Tensor

from unexrl.config import Config
from unexrl.sim.behaviour import PREFIX, Totals
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
    recent_item_ids: list[int] = field(default_factory=list)
    """the items of ``recent``'s valid slots, oldest first, as the row's recent_item_ids (a record written
    before sessions kept them has none: not :meth:`usable`, so its session reads the store's row)"""

    @staticmethod
    def of_row(row: Mapping[str, Any], cfg: Config) -> SessionBehaviour:
        """The totals of the user's row as the store serves it (``OnlineFeatures.user``)."""
        ids = row.get(f"{PREFIX}recent_item_ids")
        recent = [int(i) for i in ids][-cfg.features.recent_items :] if isinstance(ids, list | tuple) else []
        return SessionBehaviour._of(Totals.of_row(row, cfg), recent)

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
        recent = [*self.recent_item_ids, *viewed][-cfg.features.recent_items :]
        return SessionBehaviour._of(self._totals().then(page), recent)

    def usable(self, cfg: Config) -> bool:
        """Whether these totals can be served under ``cfg``: of its shape (a record written by a deployment with
        other ``world.n_categories`` or ``features.recent_items`` that shares the session store is not), counts
        within int64 and every sum finite and not negative (a stored record is checked before it is used)."""
        counts = [v for f in fields(self) if isinstance(v := getattr(self, f.name), int)]
        sums = [self.watch, self.fraction, self.viewed_duration, *self.category_watch, *self.recent]
        window = cfg.features.recent_items
        return (
            len(self.category_watch) == cfg.world.n_categories
            and len(self.recent) == window
            and all(0 <= v < 2**63 for v in counts)
            and all(math.isfinite(v) and v >= 0 for v in sums)
            and len(self.recent_item_ids) == min(self.recent_count, window)
            and all(0 <= i < cfg.world.n_items for i in self.recent_item_ids)
        )

    def inputs(self, cfg: Config) -> Tensor:
        """[1, input_dim] the model's user input of these totals, as of the row they would make."""
        return user_inputs(self._totals().features(cfg), cfg)

    def row(self, world: World, cfg: Config) -> dict[str, Any]:
        """The user_behaviour row of these totals (short feature names, the store's types): the row the feature
        build writes at the feedback of the last page they hold (unexrl/features/build.py)."""
        row = {
            name.removeprefix(PREFIX): value[0].tolist()
            for name, value in self._totals().features(cfg).items()
        }
        n = len(self.recent_item_ids)
        return row | {
            "recent_item_ids": list(self.recent_item_ids),
            "recent_category_ids": world.item_category[
                torch.tensor(self.recent_item_ids, dtype=torch.long)
            ].tolist(),
            "recent_watch_fractions": torch.tensor(self.recent[len(self.recent) - n :]).float().tolist(),
        }

    @staticmethod
    def _of(t: Totals, recent_item_ids: list[int]) -> SessionBehaviour:
        totals = {f.name: getattr(t, f.name)[0].tolist() for f in fields(Totals)}
        return SessionBehaviour(**totals, recent_item_ids=recent_item_ids)

    def _totals(self) -> Totals:
        return Totals(
            **{f.name: torch.tensor([getattr(self, f.name)], dtype=_DTYPES[f.name]) for f in fields(Totals)}
        )


_DTYPES = {
    f.name: torch.long if get_type_hints(SessionBehaviour)[f.name] is int else torch.float64
    for f in fields(Totals)
}
"""counts as int64 and sums as float64, as Totals.zeros makes them"""
