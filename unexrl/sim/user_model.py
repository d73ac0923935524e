"""How a user responds to a page: watch fraction per item, click, like, and a satisfaction budget.

Per shown item, in page order (repeats = the item's category in the recent window plus earlier items on the page):
    logit = w_aff * affinity + w_q * 2(q - 0.5) + w_short * shortness - fatigue * repeats + bonus * [repeats = 0] + noise
    watch = sigmoid(logit) * duration
    budget += gain * sigmoid(logit) * (floor + q) - cost * (0.5 + 0.5 * min(watch / median, 4)) - n / fatigue_items
where n counts the items viewed so far in the session: every session ends, however good its items, and
better pages make it longer. The session ends when the budget is spent. Immediate watch time rewards long, familiar videos; the budget rewards
quality and variety, so maximising the next page's watch time shortens the session.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from unexrl.config import Config
from unexrl.sim.hashing import hash_key, normal, uniform
from unexrl.sim.stage_models import category_repeats, shortness, true_affinity_logit
from unexrl.sim.world import World

_STREAM_RESPONSE = 37


@dataclass(frozen=True)
class PageResponse:
    watch_time: Tensor
    """[B, K] seconds watched (0 where not viewed)"""
    click: Tensor
    """[B, K] bool"""
    like: Tensor
    """[B, K] bool"""
    viewed: Tensor
    """[B, K] bool: the user was still in the session at this item"""
    budget: Tensor
    """[B] satisfaction left after the page"""
    history_items: Tensor
    """[B, W] recent watched items after the page, oldest first, -1 padded"""


class UserModel:
    """Vectorised response of a batch of users to their pages; per-type parameters from the config."""

    def __init__(self, cfg: Config, world: World) -> None:
        self.cfg, self.world = cfg, world
        types = cfg.world.user_types
        device = world.item_category.device

        def per_type(field: str) -> Tensor:
            return torch.tensor([getattr(t, field) for t in types], device=device)

        self.affinity_weight = per_type("affinity_weight")
        self.quality_weight = per_type("quality_weight")
        self.shortness_weight = per_type("shortness_weight")
        self.fatigue = per_type("fatigue")
        self.novelty_bonus = per_type("novelty_bonus")
        self.initial_budget = per_type("budget")
        self.cost = per_type("cost_per_item")
        self.gain = per_type("gain")

    def respond(
        self,
        seed: int,
        user: Tensor,
        session: Tensor,
        step: Tensor,
        page: Tensor,
        budget: Tensor,
        history_items: Tensor,
        items_watched: Tensor,
        alive: Tensor,
    ) -> PageResponse:
        """Respond to ``page`` ([B, K] item ids, in shown order) for users alive at the request."""
        w, s = self.world, self.cfg.session
        t = w.user_type[user]
        aff = true_affinity_logit(w, self.cfg.world.affinity_scale, user, page)
        quality = w.item_quality[page]
        short = shortness(w, self.cfg.world.duration_median_s, page)
        duration = w.item_duration[page]
        position = torch.arange(page.shape[1], device=page.device)
        key = hash_key(seed, _STREAM_RESPONSE, session[:, None], step[:, None], position[None, :])
        noise = s.watch_noise * normal(key)
        like_draw = uniform(key ^ 5)
        static = (
            self.affinity_weight[t, None] * aff
            + self.quality_weight[t, None] * 2 * (quality - 0.5)
            + self.shortness_weight[t, None] * short
            + noise
        )
        # repeats: the item's category in the history window, plus earlier items of this page. Users leave a
        # page at some point and never come back to it, so an item that is viewed had every earlier item viewed.
        hist_cats = torch.where(history_items >= 0, w.item_category[history_items.clamp_min(0)], -1)
        category = w.item_category[page]
        same = category[:, :, None] == category[:, None, :]
        earlier = torch.ones_like(same[0]).tril(-1)
        repeats = category_repeats(w, hist_cats, page) + (same & earlier).sum(-1)
        logit = static - self.fatigue[t, None] * repeats + self.novelty_bonus[t, None] * (repeats == 0)
        fraction = torch.sigmoid(logit)
        watched = fraction * duration
        drain = self.cost[t, None] * (0.5 + 0.5 * (watched / self.cfg.world.duration_median_s).clamp_max(4.0))
        drain = drain + (items_watched[:, None] + position) / s.fatigue_items
        gain = self.gain[t, None] * fraction * (s.quality_gain_floor + quality)
        running = budget[:, None] + torch.cumsum(gain - drain, dim=1)  # budget after each item, if viewed
        still_in = torch.cummin(running, dim=1).values > 0
        viewed = torch.cat([alive[:, None], alive[:, None] & still_in[:, :-1]], dim=1)
        n_viewed = viewed.sum(1)
        last = (n_viewed - 1).clamp_min(0)
        budget = torch.where(n_viewed > 0, running.gather(1, last[:, None]).squeeze(1), budget)
        window = history_items.shape[1]
        combined = torch.cat([history_items, page], dim=1)
        history = combined.gather(1, torch.arange(window, device=page.device)[None, :] + n_viewed[:, None])
        return PageResponse(
            watch_time=torch.where(viewed, fraction * duration, 0.0),
            click=viewed & (fraction > 0.5),
            like=viewed & (like_draw < fraction * quality * 0.5),
            viewed=viewed,
            budget=budget,
            history_items=history,
        )
