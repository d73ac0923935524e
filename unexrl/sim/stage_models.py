"""Frozen stage models: each stage emits a prediction vector v^i_j for every item j of the pool.

Predictions are the true quantities plus stage-specific error that shrinks downstream. The error is fixed at world
build: an item-level error per head, plus a low-rank user x item error on the affinity and watch heads, so a model
is deterministic given (world seed, stage, user, item) and never learns from the agents' behaviour. Exact heads
(novelty from the observable history, shortness from the known duration) carry no error.
Every head is standardised with constants fixed at world build, then rounded to float16: the logged float16
predictions are exactly the ones the cascade scored, so replay from logs is exact by construction.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from unexrl.config import HEADS, Config
from unexrl.sim.world import World

_EXACT_HEADS = ("novelty", "shortness")
_USER_ITEM_HEADS = ("affinity", "expected_watch")
_ERROR_RANK = 4


def true_affinity_logit(world: World, affinity_scale: float, user: Tensor, items: Tensor) -> Tensor:
    """[B, n] affinity logit = scale * cos(user, item); the response model and the stage models share it."""
    return affinity_scale * torch.einsum("bd,bnd->bn", world.user_latent[user], world.item_latent[items])


def shortness(world: World, median_s: float, items: Tensor) -> Tensor:
    """-log(duration / median): positive for short videos."""
    return -torch.log(world.item_duration[items] / median_s)


def category_repeats(world: World, history_categories: Tensor, items: Tensor) -> Tensor:
    """[B, n] how often each item's category occurs in the recent window (history padded with -1)."""
    counts = torch.zeros(history_categories.shape[0], world.n_categories + 1, device=items.device)
    counts.scatter_add_(1, history_categories + 1, torch.ones_like(history_categories, dtype=torch.float32))
    return counts[:, 1:].gather(1, world.item_category[items])


class StageModels:
    """Computes every stage's predictions for a pool; heads and noise come from ``cfg.cascade.stages``.

    Everything item-level (latent, quality, duration, popularity, each stage's item error and error factors)
    sits in one [n_items, F] table, so a pool costs one row gather instead of one per quantity.
    """

    def __init__(self, cfg: Config, world: World) -> None:
        self.cfg = cfg
        self.world = world
        self.heads = [
            torch.tensor([HEADS.index(h) for h in s.heads], device=world.item_category.device)
            for s in cfg.cascade.stages
        ]
        self.noise = [s.noise for s in cfg.cascade.stages]
        device = world.item_category.device
        dim = cfg.world.latent_dim
        columns = [
            world.item_latent,
            torch.logit(world.item_quality)[:, None],
            torch.log(world.item_duration)[:, None],
            world.item_log_popularity[:, None],
        ]
        self._stage_columns: list[tuple[int, int, int]] = []  # (error start, factor start, factor end)
        self.user_factor, self.user_item_mask = [], []
        width = dim + 3
        for i, stage in enumerate(cfg.cascade.stages):
            g = torch.Generator().manual_seed(cfg.seeds.world * 1009 + 100 + i)
            d = len(stage.heads)
            exact = torch.tensor([h in _EXACT_HEADS for h in stage.heads])
            columns.append((torch.randn(world.n_items, d, generator=g) * ~exact).to(device))
            columns.append(torch.randn(world.n_items, _ERROR_RANK, generator=g).to(device))
            self.user_factor.append(
                (torch.randn(world.n_users, _ERROR_RANK, generator=g) / _ERROR_RANK**0.5).to(device)
            )
            self.user_item_mask.append(
                torch.tensor([h in _USER_ITEM_HEADS for h in stage.heads], device=device)
            )
            self._stage_columns.append((width, width + d, width + d + _ERROR_RANK))
            width += d + _ERROR_RANK
        self.item_table = torch.cat(columns, dim=1).contiguous()
        self._mean = torch.zeros(len(HEADS), device=device)
        self._std = torch.ones(len(HEADS), device=device)
        self._fit_standardisation()

    def _raw_heads(self, user: Tensor, items: Tensor, rows: Tensor, history_categories: Tensor) -> Tensor:
        """[B, n, H] noise-free head values in natural units; ``rows`` is item_table gathered at ``items``."""
        w, wc = self.world, self.cfg.world
        dim = wc.latent_dim
        cosine = torch.bmm(rows[..., :dim], w.user_latent[user].unsqueeze(-1)).squeeze(-1)
        quality_logit, log_duration = rows[..., dim], rows[..., dim + 1]
        population_watch = torch.sigmoid(
            wc.affinity_scale * cosine + 2.0 * (torch.sigmoid(quality_logit) - 0.5)
        )
        return torch.stack(
            [
                cosine,
                torch.log(population_watch) + log_duration,
                quality_logit,
                -category_repeats(w, history_categories, items),
                rows[..., dim + 2],
                math.log(wc.duration_median_s) - log_duration,
            ],
            dim=-1,
        )

    def _gather(self, items: Tensor) -> Tensor:
        return self.item_table.index_select(0, items.reshape(-1)).view(*items.shape, -1)

    def _fit_standardisation(self) -> None:
        """Fix each head's mean and std on a world-seeded sample, so heads share one scale."""
        g = torch.Generator().manual_seed(self.cfg.seeds.world + 7)
        device = self.world.item_category.device
        user = torch.randint(0, self.world.n_users, (256,), generator=g).to(device)
        items = torch.randint(0, self.world.n_items, (256, 64), generator=g).to(device)
        history = self.world.item_category[
            torch.randint(0, self.world.n_items, (256, 10), generator=g).to(device)
        ]
        raw = self._raw_heads(user, items, self._gather(items), history).reshape(-1, len(HEADS))
        self._mean = raw.mean(0)
        self._std = raw.std(0).clamp_min(1e-3)

    def predict(self, user: Tensor, items: Tensor, history_categories: Tensor) -> list[Tensor]:
        """Per stage, [B, n, d_i] float32 predictions (float16-exact) of ``items`` for ``user``."""
        rows = self._gather(items)
        base = (self._raw_heads(user, items, rows, history_categories) - self._mean) / self._std
        out = []
        for i, (heads, noise) in enumerate(zip(self.heads, self.noise)):
            v = base.index_select(-1, heads)
            if noise > 0:
                e0, f0, f1 = self._stage_columns[i]
                user_item = torch.bmm(rows[..., f0:f1], self.user_factor[i][user].unsqueeze(-1))
                v = v + noise * (rows[..., e0:f0] + self.user_item_mask[i] * user_item)
            out.append(v.half().float())
        return out
