"""The simulated world: a catalogue of items and a population of users, drawn once from the world seed."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from unexrl.config import Config


@dataclass(frozen=True)
class World:
    """Items are sorted by category, so each category is the contiguous id range [offset, offset + count)."""

    item_category: Tensor
    """[n_items] int64 category of each item"""
    item_latent: Tensor
    """[n_items, D] unit-norm content vector"""
    item_quality: Tensor
    """[n_items] true quality in (0, 1), hidden from agents"""
    item_duration: Tensor
    """[n_items] duration in seconds"""
    item_log_popularity: Tensor
    """[n_items] popularity prior (log scale, standardised)"""
    category_offset: Tensor
    """[n_categories] first item id of each category"""
    category_count: Tensor
    """[n_categories] number of items in each category"""
    popular_items: Tensor
    """item ids of the popular retrieval channel, most popular first"""
    user_latent: Tensor
    """[n_users, D] unit-norm interest vector"""
    user_interest_categories: Tensor
    """[n_users, k] categories the interest channel retrieves from"""
    user_interest_cdf: Tensor
    """[n_users, k] cumulative mixing weights over those categories"""
    user_type: Tensor
    """[n_users] hidden behaviour type index"""
    user_activity_group: Tensor
    """[n_users] observable activity group (a noisy copy of the type)"""

    @property
    def n_items(self) -> int:
        return int(self.item_category.shape[0])

    @property
    def n_users(self) -> int:
        return int(self.user_latent.shape[0])

    @property
    def n_categories(self) -> int:
        return int(self.category_offset.shape[0])

    def to(self, device: torch.device | str) -> World:
        return World(**{k: v.to(device) for k, v in self.__dict__.items()})


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-8)


def build_world(cfg: Config) -> World:
    """Draw the world deterministically from ``cfg.seeds.world``."""
    w = cfg.world
    g = torch.Generator().manual_seed(cfg.seeds.world)
    n_c, dim = w.n_categories, w.latent_dim

    # Items: Zipf category sizes (each category non-empty), latent near the category centroid.
    zipf = 1.0 / torch.arange(1, n_c + 1, dtype=torch.float64) ** w.category_zipf
    extra = torch.multinomial(zipf, w.n_items - n_c, replacement=True, generator=g)
    category = torch.sort(torch.cat([torch.arange(n_c), extra])).values
    count = torch.bincount(category, minlength=n_c)
    offset = torch.cumsum(count, 0) - count
    centroid = _unit(torch.randn(n_c, dim, generator=g))
    latent = _unit(centroid[category] + w.item_spread * torch.randn(w.n_items, dim, generator=g) / dim**0.5)
    quality_z = torch.randn(w.n_items, generator=g)
    quality = torch.sigmoid(1.2 * quality_z)
    duration = (
        w.duration_median_s * torch.exp(w.duration_sigma * torch.randn(w.n_items, generator=g))
    ).clamp(3, 900)
    # popularity follows the mainstream (big categories) more than quality: popular-only retrieval is narrow
    category_z = torch.log(count.double())[category].float()
    category_z = (category_z - category_z.mean()) / category_z.std().clamp_min(1e-6)
    log_pop = 0.3 * quality_z + 1.0 * category_z + 0.7 * torch.randn(w.n_items, generator=g)
    log_pop = (log_pop - log_pop.mean()) / log_pop.std()
    n_popular = max(w.n_items // 20, 1)
    popular = torch.argsort(log_pop, descending=True)[:n_popular]

    # Users: a mix of a few categories (drawn by category size), a hidden type, a noisy observable group.
    k = min(w.interests_per_user, n_c)
    interests = torch.stack(
        [torch.multinomial(zipf, k, replacement=False, generator=g) for _ in range(w.n_users)]
    )
    mix = torch.softmax(torch.randn(w.n_users, k, generator=g), dim=1)
    user_latent = _unit(
        (mix.unsqueeze(-1) * centroid[interests]).sum(1)
        + 0.3 * torch.randn(w.n_users, dim, generator=g) / dim**0.5
    )
    shares = torch.tensor([t.share for t in w.user_types], dtype=torch.float64)
    user_type = torch.multinomial(shares, w.n_users, replacement=True, generator=g)
    accuracy = torch.tensor([t.activity_group_accuracy for t in w.user_types])[user_type]
    keep = torch.rand(w.n_users, generator=g) < accuracy
    random_group = torch.randint(0, len(w.user_types), (w.n_users,), generator=g)
    group = torch.where(keep, user_type, random_group)

    return World(
        item_category=category,
        item_latent=latent.float(),
        item_quality=quality.float(),
        item_duration=duration.float(),
        item_log_popularity=log_pop.float(),
        category_offset=offset,
        category_count=count,
        popular_items=popular,
        user_latent=user_latent.float(),
        user_interest_categories=interests,
        user_interest_cdf=torch.cumsum(mix, 1).float(),
        user_type=user_type,
        user_activity_group=group,
    ).to(cfg.device)
