"""The serving path as a library: request -> online features -> pool -> the cascade -> page, and feedback ->
session state -> long-term reward metrics. The BentoML service (serving/service.py) is a thin shell over it.

One request is tau^1 of a batch of one: the session state, history and the user's behaviour features (the model
input of unexrl.user_features) come from the feature store (falling back to defaults), the pool and every
stage's predictions from :meth:`Simulator.observe` (the frozen stage models of the world the policy was trained
in), and the page from :func:`unexrl.cascade.run_cascade` with the
artifact's policy acting at each stage, exactly as in training and evaluation.

Sessions are the service's, never the client's: a request without a session id starts one under a new
unguessable id (62 random bits) bound to the user; a request that names a session must name one the service
issued to that user and that is still open, and feedback is accepted only for a page served in the session it
names, once, with watch times at most each item's duration. A session ends with ``session_end`` or at its
``session.max_requests``-th page. Open sessions (with their in-session watch history) and the pages waiting for
feedback live in the session store (unexrl/serve/sessions.py): the process's, or Redis shared by every replica,
so any replica can take any request of a session. Each feedback also pushes the session's state to the feature
store's ``user_session`` view.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from unexrl.artifacts import load_any_artifact
from unexrl.cascade import ActFn, CascadeResult, StageView, run_cascade
from unexrl.config import Config
from unexrl.contracts.artifact import ArtifactError, ArtifactManifest
from unexrl.features import schema as fs
from unexrl.features.client import FeatureClient, OnlineFeatures
from unexrl.serve import metrics as m
from unexrl.serve.api import SESSION_ID_MAX, FeedbackItem
from unexrl.serve.behaviour import SessionBehaviour
from unexrl.serve.sessions import LocalSessions, Page, Sessions, SessionState, served_once_more, shares
from unexrl.sim.env import Policy, SessionBatch, Simulator
from unexrl.sim.world import World
from unexrl.user_features import served_inputs

log = logging.getLogger(__name__)

ENV_FEATURE_REPO = "UNEXRL_FEATURE_REPO"
"""optional: the Feast repository folder to serve from (``features.repo``); the environment is UNEXRL_FEATURE_ENV"""


class RequestError(ValueError):
    """Bad input in a request: ``field`` names it (JSON path), the message says what is wrong. A 400."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class UnknownRequest(LookupError):
    """Feedback for a page this process did not serve in the named session, or already answered; or a session id
    that is not an open session of the user. A 404, the same whichever it is (no oracle for other users' ids)."""


def serving_config(manifest: ArtifactManifest, environ: dict[str, str]) -> Config:
    """The artifact's own config (the cascade and world it was trained for), with the feature store chosen by
    the environment: UNEXRL_FEATURE_ENV (features.environment) and UNEXRL_FEATURE_REPO (features.repo)."""
    from unexrl.features.store import ENV_ENVIRONMENT

    tree = dict(manifest.config)
    features = dict(tree.get("features", {}))
    if environ.get(ENV_ENVIRONMENT):
        features["environment"] = environ[ENV_ENVIRONMENT]
    if environ.get(ENV_FEATURE_REPO):
        features["repo"] = environ[ENV_FEATURE_REPO]
    tree["features"] = features
    try:
        return Config.model_validate_json(json.dumps(tree))
    except ValueError as err:
        raise ArtifactError(f"the artifact's config is not valid here: {err}") from None


def with_anonymous_user(sim: Simulator) -> None:
    """Append one neutral user row to every user table the serving path reads, so user id -1 (negative
    indices read from the end) means "not in the id space": no interest vector, no user-item error,
    retrieval from the largest categories, the most common activity group. The actors skip negative user
    ids (``unexrl.rl.observation.sparse_features``), so a new user gets no one else's embedding."""
    w = sim.world
    k = w.user_interest_categories.shape[1]
    biggest = w.category_count.topk(k).indices
    world = replace(
        w,
        user_latent=torch.cat([w.user_latent, torch.zeros_like(w.user_latent[:1])]),
        user_interest_categories=torch.cat(
            [w.user_interest_categories, biggest[None].to(w.user_interest_categories)]
        ),
        user_interest_cdf=torch.cat(
            [w.user_interest_cdf, torch.linspace(1.0 / k, 1.0, k)[None].to(w.user_interest_cdf)]
        ),
        user_type=torch.cat([w.user_type, w.user_type[:1].clone().zero_()]),
        user_activity_group=torch.cat([w.user_activity_group, w.user_activity_group.mode().values[None]]),
    )
    sim.world = world
    sim.stage_models.world = world
    sim.stage_models.user_factor = [
        torch.cat([f, torch.zeros_like(f[:1])]) for f in sim.stage_models.user_factor
    ]


@dataclass(frozen=True)
class LoadedPolicy:
    """A verified policy artifact bound to the serving cascade."""

    policy: Policy
    version: str
    algorithm: str
    kind: str


def load_serving_policy(path: Path, cfg: Config, world: World, version: str | None = None) -> LoadedPolicy:
    """Verify (every file's sha256) and load an artifact for ``cfg``'s cascade; a tampered one raises.

    ``version``: the version it is served as (the model store tag's, which import_model set to the artifact's
    digest). An artifact whose manifest digest is another (rewritten after import, hashes and all) is refused:
    the service never reports one version while serving other weights."""
    policy, manifest = load_any_artifact(path, cfg, world)  # verified, and its version from that one reading
    if version is not None:
        check_served_version(path, manifest, version)
    return LoadedPolicy(policy, manifest.version, manifest.algorithm, manifest.kind)


def check_served_version(path: Path, manifest: ArtifactManifest, version: str) -> None:
    """Refuse an artifact (``manifest``, as read_artifact verified it) served as another ``version`` than its
    own: a model store entry rewritten after import, hashes and all."""
    if version != manifest.version:
        raise ArtifactError(
            f"{path}: served as version {version}, but its manifest's digest is {manifest.version}; refusing an "
            "artifact that is not the one imported under that version"
        )


@dataclass(frozen=True)
class FeedbackResult:
    session: SessionState
    """the session after the page"""
    ended: bool
    pushed: bool


class Recommender:
    """Serves pages with a primary policy (optionally computing a shadow policy's actions alongside)."""

    def __init__(
        self,
        cfg: Config,
        primary: Path,
        *,
        shadow: Path | None = None,
        primary_version: str | None = None,
        shadow_version: str | None = None,
        features: FeatureClient | None = None,
        sessions: Sessions | None = None,
        role: str = "stable",
    ) -> None:
        self.cfg = cfg
        self.sim = Simulator(cfg)
        self.policy = load_serving_policy(primary, cfg, self.sim.world, primary_version)
        self.shadow = (
            load_serving_policy(shadow, cfg, self.sim.world, shadow_version) if shadow is not None else None
        )
        self.n_users = self.sim.world.n_users
        with_anonymous_user(self.sim)
        self.features = features if features is not None else FeatureClient(cfg)
        self.features.warm_up()
        self.role = role
        self.seed = cfg.seeds.world
        self.stage_names = [s.name for s in cfg.cascade.stages]
        self.heads = [list(s.heads) for s in cfg.cascade.stages]
        self.sessions = sessions if sessions is not None else LocalSessions()
        m.MODEL_INFO.labels(self.version, role, self.policy.algorithm, self.policy.kind).set(1)
        # exported at 0: no cold starts is a rate of 0, not no data
        m.COLD_START_REQUESTS.labels(self.version)
        if self.shadow is not None:
            m.MODEL_INFO.labels(self.shadow.version, "shadow", self.shadow.algorithm, self.shadow.kind).set(1)
        self.version_label = m.VersionLabels([self.version] + ([self.shadow.version] if self.shadow else []))

    @property
    def version(self) -> str:
        return self.policy.version

    # -- /recommend ---------------------------------------------------------------------------------------

    def recommend(
        self, user_id: int, session_id: int | None = None, candidates: Sequence[int] | None = None
    ) -> Page:
        start = time.perf_counter()
        known = 0 <= user_id < self.n_users
        pool = self._pool(candidates)
        online = self.features.fetch(user_id, [], session=session_id is not None)
        fetched = time.perf_counter()
        session = self._session(user_id, session_id, online)
        # a page asked for before the session's earlier pages are answered leaves their items out
        pending = self.sessions.pending(session.session_id) if session_id is not None else frozenset()
        sessioned = time.perf_counter()
        batch = self._batch(user_id if known else -1, session)
        pool = self._without(pending, pool, batch)
        behaviour = self._behaviour(session)
        user_features = (
            served_inputs(online.user, self.cfg)  # no page answered yet: the row itself
            if behaviour is None or (session.step == 0 and not online.degraded)
            else behaviour.inputs(self.cfg)
        )
        obs = self.sim.observe(batch, pool, user_features=user_features)
        group = int(online.user.get(f"{fs.USER_PROFILE.name}__activity_group", -1))
        if known and 0 <= group < len(self.cfg.world.user_types):
            obs = replace(obs, activity_group=torch.tensor([group]))
        observed = time.perf_counter()
        marks: list[float] = []
        result = run_cascade(
            obs.predictions, self.sim.keep, _marking(lambda v: self.policy.policy.act(obs, v), marks)
        )
        marks.append(time.perf_counter())
        items = obs.pool.gather(1, result.page)[0].tolist()
        page = Page(
            request_id=secrets.token_hex(12),
            user_id=user_id,
            session=session,
            items=items,
            actions=[a[0].tolist() for a in result.actions],
            candidates=[int(v.predictions.shape[1]) for v in result.views],
            cold_start=not known,
            degraded=online.degraded,
            served_at=time.time(),
            model_version=self.version,
        )
        if session_id is None:  # issued with this page: its next one may be asked for before any feedback
            self.sessions.save(session)
        self.sessions.add_page(page)
        if self.shadow is not None:  # in the request: its time is the client's too
            self._run_shadow(obs, items)
        self._observe_request(page, result, [start, fetched, sessioned, observed], marks)
        return page

    def _pool(self, candidates: Sequence[int] | None) -> torch.Tensor | None:
        if candidates is None:
            return None
        n_items = self.sim.world.n_items
        need = self.sim.keep[0]
        if len(candidates) < need:
            raise RequestError(
                "candidates",
                f"{len(candidates)} items; the first stage keeps {need}, so at least {need} are needed",
            )
        seen: set[int] = set()
        for i, item in enumerate(candidates):
            if not 0 <= item < n_items:
                raise RequestError(
                    f"candidates[{i}]", f"item {item} is not in the catalogue (ids 0..{n_items - 1})"
                )
            if item in seen:
                raise RequestError(f"candidates[{i}]", f"item {item} appears more than once")
            seen.add(item)
        return torch.tensor([list(candidates)], dtype=torch.long)

    def _without(
        self, pending: frozenset[int], pool: torch.Tensor | None, batch: SessionBatch
    ) -> torch.Tensor | None:
        """``pool`` (None: the request's retrieval pool) without the ``pending`` items of the session's unanswered
        pages, while the first stage still has enough to keep; the pool as it was without any."""
        if not pending:
            return pool
        full = self.sim.retrieve(batch) if pool is None else pool
        kept = [i for i in full[0].tolist() if i not in pending]
        if len(kept) < self.sim.keep[0]:
            log.warning(
                "session %d: too few candidates without its pending pages' items", int(batch.session[0])
            )
            return pool
        return torch.tensor([kept], dtype=torch.long)

    def _session(self, user_id: int, requested: int | None, online: OnlineFeatures) -> SessionState:
        """The session this request belongs to: a new one when none is named; else the named session if it is an
        open session of this user (this process's cache, else the feature store's current session)."""
        u = online.user
        window = self.cfg.session.history_window
        history = [int(i) for i in u[f"{fs.USER_BEHAVIOUR.name}__recent_item_ids"]][-window:]
        if requested is None:
            return SessionState(
                session_id=1 + secrets.randbelow(SESSION_ID_MAX),
                user_id=user_id,
                history=history,
                behaviour=None if online.degraded else SessionBehaviour.of_row(u, self.cfg),
            )
        cached = self.sessions.session(requested)
        if cached is not None and cached.user_id == user_id:
            return replace(cached, history=list(cached.history))
        # checked after the read: a session that ends between the two is ended here, not rebuilt from the row
        if cached is None and self.sessions.ended(requested):  # whatever the feature store's row still says
            raise _unknown_session(requested, user_id)
        if cached is None and int(u[f"{fs.USER_SESSION.name}__session_id"]) == requested:
            return SessionState(
                session_id=requested,
                user_id=user_id,
                step=int(u[f"{fs.USER_SESSION.name}__session_step"]),
                items_watched=int(u[f"{fs.USER_SESSION.name}__session_items_watched"]),
                watch_time_s=float(u[f"{fs.USER_SESSION.name}__session_watch_time_s"]),
                last_watch_fraction=float(u[f"{fs.USER_SESSION.name}__last_watch_fraction"]),
                history=history,
                # its pages answered so far are in the row only if materialised; those to come are added
                behaviour=None if online.degraded else SessionBehaviour.of_row(u, self.cfg),
            )
        raise _unknown_session(requested, user_id)

    def _behaviour(self, s: SessionState) -> SessionBehaviour | None:
        """The session's behaviour totals, or None (its requests read the store's row) when it has none or they
        are not usable here (another config's shape, or values no page could give)."""
        if s.behaviour is not None and not s.behaviour.usable(self.cfg):
            log.warning(
                "session store: ignoring session %d's behaviour totals, not usable here", s.session_id
            )
            return None
        return s.behaviour

    def _batch(self, user: int, s: SessionState) -> SessionBatch:
        window = self.cfg.session.history_window
        history = [i for i in s.history if 0 <= i < self.sim.world.n_items][-window:]
        return SessionBatch(
            seed=self.seed,
            user=torch.tensor([user]),
            session=torch.tensor([s.session_id]),
            step=torch.tensor([s.step]),
            budget=torch.zeros(1),
            items_watched=torch.tensor([float(s.items_watched)]),
            watch_time=torch.tensor([s.watch_time_s]),
            last_watch_fraction=torch.tensor([s.last_watch_fraction]),
            history_items=torch.tensor([[-1] * (window - len(history)) + history]),
            alive=torch.ones(1, dtype=torch.bool),
            row=torch.zeros(1, dtype=torch.long),
        )

    def _observe_request(
        self, page: Page, result: CascadeResult, steps: list[float], marks: list[float]
    ) -> None:
        """The request's metrics; ``steps``: its start and the ends of the feature read, the session's read and
        retrieval; ``marks``: the cascade stages' ends."""
        v = self.version
        for name, t0, t1 in zip(("features", "session", "retrieval"), steps, steps[1:]):
            m.STAGE_LATENCY.labels(v, name).observe(t1 - t0)
        for name, t0, t1, n in zip(self.stage_names, marks, marks[1:], page.candidates):
            m.STAGE_LATENCY.labels(v, name).observe(t1 - t0)
            m.STAGE_CANDIDATES.labels(v, name).observe(n)
        self._observe_actions(v, self.role, page.actions)
        if page.cold_start:
            m.COLD_START_REQUESTS.labels(v).inc()
        m.RECOMMEND_LATENCY.labels(v).observe(time.perf_counter() - steps[0])

    def _observe_actions(self, version: str, role: str, actions: list[list[float]]) -> None:
        for name, heads, action in zip(self.stage_names, self.heads, actions):
            for head, value in zip(heads, action):
                m.STAGE_ACTION.labels(version, role, name, head).observe(value)

    def _run_shadow(self, obs: Any, served: list[int]) -> None:
        """The shadow policy on the same tau^1: its actions and page overlap become metrics, never the response."""
        assert self.shadow is not None
        shadow = self.shadow
        try:
            result = run_cascade(obs.predictions, self.sim.keep, lambda v: shadow.policy.act(obs, v))
        except Exception:
            log.exception("shadow model %s failed", shadow.version)
            return
        self._observe_actions(shadow.version, "shadow", [a[0].tolist() for a in result.actions])
        page = set(obs.pool.gather(1, result.page)[0].tolist())
        if served:
            m.SHADOW_OVERLAP.labels(self.version, shadow.version).observe(
                len(page.intersection(served)) / len(served)
            )

    # -- /feedback ----------------------------------------------------------------------------------------

    def feedback(
        self, request_id: str, session_id: int, items: Sequence[FeedbackItem], session_end: bool
    ) -> FeedbackResult:
        duration = self.sim.world.item_duration
        page = self.sessions.page(request_id)
        if page is not None and not all(0 <= i < len(duration) for i in page.items):
            log.warning("session store: ignoring page %r, whose items are not in the catalogue", request_id)
            page = None
        if page is None or page.session.session_id != session_id:
            raise _unknown_page(request_id, session_id)
        _check_items(page, items, duration)
        answered = {it.item_id: it for it in items}
        viewed = [i for i in page.items if i in answered]  # page order, as the user scrolled
        watch = [answered[i].watch_time_s for i in viewed]
        click, like = [answered[i].click for i in viewed], [answered[i].like for i in viewed]
        fractions = [w / float(duration[i]) for w, i in zip(watch, viewed)]
        max_requests, window = self.cfg.session.max_requests, self.cfg.session.history_window
        # the page's reward is its model's, not this replica's (during a canary the two may differ)
        chose = page.model_version or self.version

        def with_page(session: SessionState) -> SessionBehaviour | None:
            behaviour = self._behaviour(session)
            if behaviour is None:
                return None
            return behaviour.with_page(
                self.sim.world,
                self.cfg,
                first=session.step == 0,
                viewed=viewed,
                watch_time_s=watch,
                click=click,
                like=like,
            )

        def change(current: SessionState | None) -> tuple[SessionState, bool]:
            # the session as it is now: another page of it may have had its feedback since this one was served
            before = current if current is not None and current.user_id == page.user_id else page.session
            after = replace(
                before,
                step=before.step + 1,
                items_watched=before.items_watched + len(viewed),
                watch_time_s=before.watch_time_s + sum(watch),
                last_watch_fraction=sum(fractions) / len(fractions)
                if fractions
                else before.last_watch_fraction,
                history=(before.history + viewed)[-window:],
                touched=time.time(),
                behaviour=with_page(before),
                served_by=served_once_more(before.served_by, chose),
            )
            return after, session_end or after.step >= max_requests

        outcome = self.sessions.update(session_id, request_id, change)
        if outcome is None:  # the session ended without this page
            raise _unknown_page(request_id, session_id)
        # claimed once counted: a retry after a failed update (a 503) still finds its page, and of two deliveries
        # of one feedback (the session counts it once either way) only the one that claims it records metrics
        if not self.sessions.claim(request_id):
            raise _unknown_page(request_id, session_id)
        after, ended = outcome
        label = self.version_label(chose)
        m.FEEDBACK_LAG.labels(label).observe(max(time.time() - page.served_at, 0.0))
        for w in watch:
            m.ITEM_WATCH_TIME.labels(label).observe(w)
        # the session's totals count once: when this page ended it (not one counted before, answered again)
        if ended and after.counted[-1] == request_id:
            _observe_ended(after, self.version_label)
        at = datetime.now(UTC)
        state = (
            (-1, 0, 0, 0.0, 0.5)  # no session open: the view's defaults
            if ended
            else (
                after.session_id,
                after.step,
                after.items_watched,
                after.watch_time_s,
                after.last_watch_fraction,
            )
        )
        pushed = self.features.push_session(page.user_id, at, *state)
        if after.behaviour is not None and after.behaviour.usable(self.cfg):
            # the row a materialisation of the logs up to this page would write: the user's next session reads it.
            # Stamped when the page was served, before the build stamps that page's row (its feedback time): a
            # materialisation of logs that hold the page replaces this row (and fills in any page serving missed),
            # while this replaces a materialised row of earlier pages
            row = after.behaviour.row(self.sim.world, self.cfg)
            served = datetime.fromtimestamp(page.served_at, UTC)
            pushed = self.features.push(fs.USER_BEHAVIOUR, page.user_id, served, row) and pushed
        return FeedbackResult(session=after, ended=ended, pushed=pushed)


def _unknown_session(session_id: int, user_id: int) -> UnknownRequest:
    m.FEEDBACK_REJECTED.labels("unknown_session").inc()
    return UnknownRequest(
        f"context.session_id: {session_id} is not an open session of user {user_id}; omit it to start one"
    )


def _unknown_page(request_id: str, session_id: int) -> UnknownRequest:
    m.FEEDBACK_REJECTED.labels("unknown_request").inc()
    return UnknownRequest(
        f"request_id: {request_id!r} is not a page served in session {session_id}, "
        "or its feedback was already received"
    )


def _check_items(page: Page, items: Sequence[FeedbackItem], duration: torch.Tensor) -> None:
    shown = set(page.items)
    seen: set[int] = set()
    for i, it in enumerate(items):
        problem = None
        if it.item_id not in shown:
            problem = f"item {it.item_id} was not on page {page.request_id}"
        elif it.item_id in seen:
            problem = f"item {it.item_id} appears more than once"
        if problem is not None:
            m.FEEDBACK_REJECTED.labels("invalid").inc()
            raise RequestError(f"items[{i}].item_id", problem)
        limit = float(duration[it.item_id])
        if it.watch_time_s > limit:
            m.FEEDBACK_REJECTED.labels("invalid").inc()
            raise RequestError(
                f"items[{i}].watch_time_s",
                f"{it.watch_time_s} s is longer than item {it.item_id} ({limit} s)",
            )
        seen.add(it.item_id)


def _marking(act: ActFn, marks: list[float]) -> ActFn:
    """``act`` that records when each stage starts: consecutive marks time a stage's action plus its top-K."""

    def timed(view: StageView) -> torch.Tensor:
        marks.append(time.perf_counter())
        return act(view)

    return timed


def _observe_ended(session: SessionState, label: m.VersionLabels) -> None:
    """An ended session's reward and length, shared among the model versions that chose its pages (each by its
    share of them): summed over versions, the session counts once."""
    for chose, share in shares(session.served_by).items():
        version = label(chose)
        m.SESSIONS_ENDED.labels(version).inc(share)
        m.SESSION_WATCH_TIME.labels(version).inc(share * session.watch_time_s)
        m.SESSION_ITEMS.labels(version).inc(share * session.items_watched)
        m.SESSION_REQUESTS.labels(version).inc(share * session.step)
