"""The batched simulator: sessions of requests through the cascade, answered by the user model.

A request's randomness is keyed by (seed, session, step), a user by (seed, session): a rollout is reproducible
whatever batch size simulates it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Protocol

import torch
from torch import Tensor

from unexrl.cascade import CascadeResult, StageView, run_cascade
from unexrl.config import Config
from unexrl.sim.behaviour import Totals, UserBehaviour
from unexrl.sim.hashing import hash_key, uniform
from unexrl.sim.retrieval import retrieve_pool
from unexrl.sim.stage_models import StageModels
from unexrl.sim.user_model import PageResponse, UserModel
from unexrl.sim.world import World, build_world
from unexrl.user_features import cold_inputs, user_inputs

_STREAM_USER = 5


@dataclass(frozen=True)
class Observation:
    """tau^1 of a batch of requests: everything observable before the first stage acts."""

    user: Tensor
    """[B] user ids"""
    activity_group: Tensor
    """[B] observable activity group"""
    session: Tensor
    """[B] session ids"""
    step: Tensor
    """[B] requests already served in this session"""
    items_watched: Tensor
    """[B] items viewed so far in the session"""
    watch_time: Tensor
    """[B] seconds watched so far in the session"""
    last_watch_fraction: Tensor
    """[B] mean watch fraction of the previous page (0.5 at session start)"""
    history_items: Tensor
    """[B, W] recently watched item ids, oldest first, -1 padded"""
    pool: Tensor
    """[B, P] item ids of the retrieval pool"""
    predictions: tuple[Tensor, ...]
    """per stage, [B, P, d_i] predictions for the whole pool"""
    user_features: Tensor
    """[B, F] the user's behaviour features as model input (unexrl.user_features.user_inputs): the rollout's
    running aggregates here, the online store's row at serving"""
    oracle_type: Tensor
    """[B] hidden behaviour type: simulator-only, for oracle baselines; never logged or served"""
    row: Tensor
    """[B] each request's row in its batch as the rollout started (finished sessions are compacted away, so a
    policy or consumer keyed by row reads this, not the position)"""


class Policy(Protocol):
    """A multi-stage policy: one action per stage, chosen from tau^1 and the stage's own view."""

    def act(self, obs: Observation, view: StageView) -> Tensor:
        """Return stage ``view.stage``'s action, [B, d_i], within the configured bounds."""
        ...


@dataclass(frozen=True)
class Step:
    """One batched request: what was observed, what the cascade did, how users responded."""

    obs: Observation
    cascade: CascadeResult
    page_items: Tensor
    """[B, K] item ids shown, in order"""
    response: PageResponse
    reward: Tensor
    """[B] page watch time in seconds"""
    active: Tensor
    """[B] the session was alive when the request came"""
    done: Tensor
    """[B] the session ended at this request (satisfaction spent or request cap)"""


class Simulator:
    """Holds the world, the stage models and the user model; state lives in :class:`SessionBatch`."""

    def __init__(self, cfg: Config, world: World | None = None) -> None:
        self.cfg = cfg
        self.world = world if world is not None else build_world(cfg)
        self.stage_models = StageModels(cfg, self.world)
        self.user_model = UserModel(cfg, self.world)
        self.keep = [s.keep for s in cfg.cascade.stages]

    def start(self, seed: int, session: Tensor, behaviour: UserBehaviour | None = None) -> SessionBatch:
        """Start sessions ``session`` (global ids within this seed's rollout); their users come from the seed.

        ``behaviour``: the rollout's user_behaviour aggregates, shared by all its batches (default: a fresh one,
        users without history)."""
        device = self.world.item_category.device
        session = session.to(device)
        behaviour = behaviour if behaviour is not None else UserBehaviour(self.cfg, self.world)
        user = (uniform(hash_key(seed, _STREAM_USER, session)) * self.world.n_users).long()
        b = session.shape[0]
        zeros = torch.zeros(b, device=device)
        return SessionBatch(
            seed=seed,
            user=user,
            session=session,
            step=torch.zeros(b, dtype=torch.long, device=device),
            budget=self.user_model.initial_budget[self.world.user_type[user]].clone(),
            items_watched=zeros.clone(),
            watch_time=zeros.clone(),
            last_watch_fraction=torch.full((b,), 0.5, device=device),
            history_items=torch.full(
                (b, self.cfg.session.history_window), -1, dtype=torch.long, device=device
            ),
            alive=torch.ones(b, dtype=torch.bool, device=device),
            row=torch.arange(b, device=device),
            behaviour=behaviour,
            totals=behaviour.new_sessions(b),
        )

    def retrieve(self, state: SessionBatch) -> Tensor:
        """[B, pool_size] the retrieval pool of each request: keyed by its session and step."""
        c = self.cfg.cascade
        return retrieve_pool(
            self.world, state.seed, state.user, state.session, state.step, c.pool_size, c.channel_shares
        )

    def observe(
        self, state: SessionBatch, pool: Tensor | None = None, user_features: Tensor | None = None
    ) -> Observation:
        """Build tau^1: the pool from retrieval (or ``pool``, [B, P] item ids a caller supplies, as a serving
        request may) and every stage's predictions for it; the user features from the rollout's aggregates (or
        ``user_features``, [B, F], as serving reads them from the online store)."""
        if pool is None:
            pool = self.retrieve(state)
        hist_cats = torch.where(
            state.history_items >= 0, self.world.item_category[state.history_items.clamp_min(0)], -1
        )
        predictions = self.stage_models.predict(state.user, pool, hist_cats)
        b, totals = state.behaviour, state.totals
        if user_features is not None:
            features = user_features
        elif b is None or totals is None:
            features = cold_inputs(len(state.user), self.cfg)
        else:
            features = user_inputs(b.rows(state.user, totals), self.cfg)
        return Observation(
            user=state.user,
            activity_group=self.world.user_activity_group[state.user],
            session=state.session,
            step=state.step,
            items_watched=state.items_watched,
            watch_time=state.watch_time,
            last_watch_fraction=state.last_watch_fraction,
            history_items=state.history_items,
            pool=pool,
            predictions=tuple(predictions),
            user_features=features.to(pool.device),
            oracle_type=self.world.user_type[state.user],
            row=state.row,
        )

    def step(self, state: SessionBatch, policy: Policy) -> Step:
        """Serve one request to every session in ``state`` and advance it in place."""
        return self.serve(state, self.observe(state), policy)

    def serve(self, state: SessionBatch, obs: Observation, policy: Policy) -> Step:
        """Run the cascade on tau^1 = ``obs``, let users respond, and advance ``state`` (fields are replaced,
        never modified in place, so a shallow copy of a state can be served again)."""
        result = run_cascade(obs.predictions, self.keep, lambda view: policy.act(obs, view))
        page_items = obs.pool.gather(1, result.page)
        response, reward, active, done = self.respond(state, page_items)
        return Step(
            obs=obs,
            cascade=result,
            page_items=page_items,
            response=response,
            reward=reward,
            active=active,
            done=done,
        )

    def respond(self, state: SessionBatch, page_items: Tensor) -> tuple[PageResponse, Tensor, Tensor, Tensor]:
        """Let users respond to pages ([B, K] item ids, shown order) and advance ``state``; returns the response,
        the page watch time [B], and the active / done masks. Pages chosen elsewhere (a serving endpoint that
        simulated users browse, unexrl/serve/traffic.py) are answered exactly as the simulator's own."""
        active = state.alive
        response = self.user_model.respond(
            state.seed,
            state.user,
            state.session,
            state.step,
            page_items,
            state.budget,
            state.history_items,
            state.items_watched,
            active,
        )
        reward = response.watch_time.sum(1)
        n_viewed = response.viewed.sum(1).float()
        first_request = state.step == 0
        state.step = state.step + active.long()
        state.budget = response.budget
        state.items_watched = state.items_watched + n_viewed
        state.watch_time = state.watch_time + reward
        fraction = torch.where(
            response.viewed, response.watch_time / self.world.item_duration[page_items], 0.0
        )
        state.last_watch_fraction = torch.where(
            n_viewed > 0, fraction.sum(1) / n_viewed.clamp_min(1), state.last_watch_fraction
        )
        state.history_items = response.history_items
        alive_after = active & (response.budget > 0) & (state.step < self.cfg.session.max_requests)
        done = active & ~alive_after
        state.alive = alive_after
        if state.behaviour is not None and state.totals is not None:
            self._record_behaviour(state, active, done, first_request, page_items, response)
        return response, reward, active, done

    def _record_behaviour(
        self,
        state: SessionBatch,
        active: Tensor,
        done: Tensor,
        first_request: Tensor,
        page_items: Tensor,
        response: PageResponse,
    ) -> None:
        """The answered pages join their sessions' totals; ended sessions join their users' histories."""
        assert state.behaviour is not None and state.totals is not None
        rows = torch.nonzero(active, as_tuple=True)[0]
        pages = Totals.of_pages(
            self.world,
            self.cfg.features.recent_items,
            first_request[rows],
            page_items[rows],
            response.watch_time[rows],
            response.viewed[rows],
            response.click[rows],
            response.like[rows],
        )
        state.totals.add(rows, pages)
        ended = torch.nonzero(done, as_tuple=True)[0]
        state.behaviour.end_sessions(state.session[ended], state.user[ended], state.totals.take(ended))


@dataclass
class SessionBatch:
    """Mutable state of a batch of sessions."""

    seed: int
    user: Tensor
    session: Tensor
    step: Tensor
    budget: Tensor
    items_watched: Tensor
    watch_time: Tensor
    last_watch_fraction: Tensor
    history_items: Tensor
    alive: Tensor
    row: Tensor
    """[B] each session's row in the batch as started (Observation.row)"""
    behaviour: UserBehaviour | None = None
    """the rollout's user histories (None: the serving path, whose user features come from the online store)"""
    totals: Totals | None = None
    """[B] each session's own answered pages so far (its part of the user_behaviour row)"""

    def select(self, idx: Tensor) -> SessionBatch:
        """The sessions at positions ``idx`` (a rollout drops finished ones; every draw is keyed by session and
        step, not by position, so what the kept sessions see does not change)."""
        per_row = {
            f.name: getattr(self, f.name)[idx]
            for f in fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        return SessionBatch(
            seed=self.seed,
            behaviour=self.behaviour,
            totals=self.totals.take(idx) if self.totals is not None else None,
            **per_row,
        )
