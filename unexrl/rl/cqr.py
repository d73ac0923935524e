"""Category quantile rescaling (CQR): replace a reward by its quantile among similar users and items.

    r~_{u,i} = Phi(r_{u,i} | G_u, G_i)        (spec: "Category quantile rescaling")

G_u is the user's observable activity group, G_i the item's duration bucket (watch time is dominated by
duration). Phi is the empirical CDF of per-item watch time of viewed items in that cell, stored as quantile
knots fitted on training logs only and interpolated linearly, so r~ is about uniform in [0, 1] within a cell.
The request reward for training is the sum of r~ over the viewed items of the page; reports always use raw
watch time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def duration_bucket(duration_s: Tensor, edges_s: Sequence[float]) -> Tensor:
    """Item group G_i: index of the duration bucket (0 .. len(edges))."""
    return torch.bucketize(duration_s, torch.tensor(list(edges_s), dtype=duration_s.dtype, device=duration_s.device))


def fit_cqr_knots(
    watch_time: Tensor, user_group: Tensor, item_group: Tensor, n_user_groups: int, n_item_groups: int, n_knots: int
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
    idx = torch.searchsorted(cell.contiguous(), reward.unsqueeze(-1).contiguous(), right=True).squeeze(-1).clamp(1, n - 1)
    lo = cell.gather(-1, (idx - 1).unsqueeze(-1)).squeeze(-1)
    hi = cell.gather(-1, idx.unsqueeze(-1)).squeeze(-1)
    frac = ((reward - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)
    return ((idx - 1).to(reward.dtype) + frac) / (n - 1)
