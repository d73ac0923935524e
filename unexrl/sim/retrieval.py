"""Action-independent retrieval: the pool I^1 of a request, from user-interest, popular and random channels.

The pool is a pure function of (seed, user, session, step): no policy can change it, which is what lets CIC
treat it as part of the first-stage observation tau^1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from unexrl.sim.hashing import hash_key, uniform, uniform_pair
from unexrl.sim.world import World

_STREAM_POOL = 11
_MAX_DEDUP_ROUNDS = 16


def retrieve_pool(
    world: World,
    seed: int,
    user: Tensor,
    session: Tensor,
    step: Tensor,
    pool_size: int,
    channel_shares: tuple[float, float, float],
) -> Tensor:
    """Return [B, pool_size] distinct item ids, sorted ascending, for each (user, session, step) row."""
    device = user.device
    slot = torch.arange(pool_size, device=device)
    key = hash_key(hash_key(seed, _STREAM_POOL, session, step)[:, None], slot[None, :])
    n_interest = round(channel_shares[0] / sum(channel_shares) * pool_size)
    n_popular = round(channel_shares[1] / sum(channel_shares) * pool_size)

    # user-interest channel: pick one of the user's categories by its mixing weight, then an item in it
    u_a, u_b = uniform_pair(key)
    u_cat = u_a
    which = torch.searchsorted(world.user_interest_cdf[user], u_cat, right=True)
    which = which.clamp_max(world.user_interest_cdf.shape[1] - 1)
    cat = world.user_interest_categories[user].gather(1, which)
    in_cat = (u_b * world.category_count[cat]).long()
    interest = world.category_offset[cat] + in_cat
    popular = world.popular_items[(u_a * world.popular_items.numel()).long()]
    random = (u_b * world.n_items).long()
    pool = torch.where(
        slot < n_interest, interest, torch.where(slot < n_interest + n_popular, popular, random)
    )
    return _deduplicate(pool, key, world.n_items)


def _deduplicate(pool: Tensor, key: Tensor, n_items: int) -> Tensor:
    """Replace repeated ids with fresh random items until every row holds distinct ids."""
    for round_ in range(_MAX_DEDUP_ROUNDS):
        pool, order = pool.sort(dim=1)
        key = key.gather(1, order)
        dup = torch.zeros_like(pool, dtype=torch.bool)
        dup[:, 1:] = pool[:, 1:] == pool[:, :-1]
        if not bool(dup.any()):
            return pool
        fresh = (uniform(key ^ (101 + round_)) * n_items).long()
        pool = torch.where(dup, fresh, pool)
    raise RuntimeError(f"could not draw {pool.shape[1]} distinct items from a catalogue of {n_items}")
