"""Category quantile rescaling (CQR): replace a reward by its quantile among similar users and items.

    r~ = Phi(r | G_u, G_i)        (spec: "Category quantile rescaling")

G_u is the user's observable activity group. Phi is an empirical CDF stored as quantile knots fitted on training
data only and interpolated linearly, so r~ is about uniform in [0, 1] within a cell. What r is depends on
``features.cqr_unit``:

- ``page`` (default): r is the request's page watch time, one item group: r~_t = Phi(page watch | G_u).
- ``item`` (the spec's reading): r is each viewed item's watch time, G_i its duration bucket, and the request's
  reward is the sum of r~ over the page's viewed items.

The item reading rewards short items watched through: its true gradient at CEM points away from watch time's for
the quality-driven users (cosine -0.73 on configs/default.yaml, docs/results.md), so the page reading is the
default. Reports always use raw watch time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from unexrl.config import Config


def n_item_groups(cfg: Config) -> int:
    """Number of item groups G_i: one at page level, the duration buckets at item level."""
    return 1 if cfg.features.cqr_unit == "page" else len(cfg.features.duration_bucket_edges_s) + 1


def duration_bucket(duration_s: Tensor, edges_s: Sequence[float]) -> Tensor:
    """Item group G_i: index of the duration bucket (0 .. len(edges))."""
    return torch.bucketize(
        duration_s, torch.tensor(list(edges_s), dtype=duration_s.dtype, device=duration_s.device)
    )


def fit_cqr_knots(
    watch_time: Tensor,
    user_group: Tensor,
    item_group: Tensor,
    n_user_groups: int,
    n_item_groups: int,
    n_knots: int,
) -> Tensor:
    """[G_u, G_i, n_knots] quantiles of ``watch_time`` per cell (1-D inputs, one entry per viewed item).

    A cell without data falls back to the quantiles of all data, so every cell maps onto [0, 1].
    """
    levels = torch.linspace(0, 1, n_knots, dtype=torch.float64)
    values = watch_time.double()
    overall = torch.quantile(values, levels)
    knots = overall.expand(n_user_groups, n_item_groups, n_knots).clone()
    for g in range(n_user_groups):
        for h in range(n_item_groups):
            cell = values[(user_group == g) & (item_group == h)]
            if cell.numel() > 0:
                knots[g, h] = torch.quantile(cell, levels)
    return knots.float()


def cqr_transform(reward: Tensor, user_group: Tensor, item_group: Tensor, knots: Tensor) -> Tensor:
    """Phi(r | G_u, G_i): the empirical CDF at ``reward`` by linear interpolation between the cell's knots."""
    cell = knots[user_group, item_group]  # [..., n_knots]
    n = cell.shape[-1]
    idx = (
        torch.searchsorted(cell.contiguous(), reward.unsqueeze(-1).contiguous(), right=True)
        .squeeze(-1)
        .clamp(1, n - 1)
    )
    lo = cell.gather(-1, (idx - 1).unsqueeze(-1)).squeeze(-1)
    hi = cell.gather(-1, idx.unsqueeze(-1)).squeeze(-1)
    frac = ((reward - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)
    return ((idx - 1).to(reward.dtype) + frac) / (n - 1)


def training_reward(
    watch_time: Tensor,
    viewed: Tensor,
    user_group: Tensor,
    item_group: Tensor,
    knots: Tensor | None,
    cfg: Config,
) -> Tensor:
    """[B] training reward of requests from their pages' per-item ``watch_time`` and ``viewed`` ([B, K]): CQR with
    ``knots`` (``features.cqr_unit``), else the page's watch time in pages of median-length videos (about one).

    ``user_group`` [B] is G_u; ``item_group`` [B, K] each shown item's duration bucket (used at item level only).
    """
    watch = watch_time * viewed
    if knots is None:
        return watch.sum(1) / (cfg.world.duration_median_s * cfg.cascade.page_size)
    if cfg.features.cqr_unit == "page":
        return cqr_transform(watch.sum(1), user_group, torch.zeros_like(user_group), knots)
    return (cqr_transform(watch, user_group[:, None].expand_as(watch), item_group, knots) * viewed).sum(1)
