"""The session store: the process's and Redis's behave alike (a page claimed once, ended sessions void, malformed
records ignored), and a Redis that cannot be reached is one named error; the engine's use of it (every page of a
session counts, a stored page is checked before it is used)."""

from __future__ import annotations

import copy
import json
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from prometheus_client import REGISTRY, Histogram

from unexrl.config import Config
from unexrl.features import schema as fs
from unexrl.policies.artifact import save_weight_policy
from unexrl.policies.weights import WeightPolicy, greedy_weights
from unexrl.serve.api import FeedbackItem
from unexrl.serve.behaviour import SessionBehaviour
from unexrl.serve.engine import Recommender, UnknownRequest
from unexrl.serve.metrics import ITEM_WATCH_TIME, OTHER_VERSION, VersionLabels
from unexrl.serve.sessions import (
    KEY_PREFIX,
    MAX_TRANSACTION_ATTEMPTS,
    MAX_VERSIONS_PER_SESSION,
    SESSION_TTL_S,
    LocalSessions,
    Page,
    RedisSessions,
    Sessions,
    SessionState,
    SessionStoreUnavailable,
    _redis_options,
    open_sessions,
)
from unexrl.user_features import cold_inputs, served_inputs, user_inputs


def _page(request_id: str, session: SessionState) -> Page:
    return Page(request_id, session.user_id, session, [1, 2], [[0.5]], [10], False, False, time.time(), "v1")


@pytest.fixture(params=["local", "redis"])
def store(request: pytest.FixtureRequest) -> Sessions:
    if request.param == "local":
        return LocalSessions()
    return RedisSessions(request.getfixturevalue("redis_address"))


def test_a_page_expires_with_its_session_in_the_process_too() -> None:
    """Redis drops a page after SESSION_TTL_S; the process's store reads it as gone then too, so late feedback
    cannot bring an idle session back."""
    store = LocalSessions()
    state = SessionState(session_id=43, user_id=7)
    store.add_page(replace(_page("late", state), served_at=time.time() - SESSION_TTL_S - 1))
    assert store.page("late") is None


def test_the_process_store_drops_idle_records_as_redis_does_without_counting_evictions() -> None:
    """Records idle for SESSION_TTL_S leave the process's tables as Redis expires them: the eviction counter then
    counts only records dropped at the bound, which is what it reports."""
    store = LocalSessions()
    old = time.time() - SESSION_TTL_S - 1
    stale = SessionState(session_id=4501, user_id=7, touched=old)
    store.save(stale)
    store.add_page(replace(_page("old", stale), served_at=old))
    before = {
        r: REGISTRY.get_sample_value("unexrl_session_store_evictions_total", {"record": r})
        for r in ("page", "session")
    }
    fresh = SessionState(session_id=4502, user_id=7)
    store.save(fresh)
    store.add_page(_page("new", fresh))
    assert list(store._sessions) == [4502] and list(store._pages) == ["new"]
    after = {
        r: REGISTRY.get_sample_value("unexrl_session_store_evictions_total", {"record": r})
        for r in ("page", "session")
    }
    assert after == before


def test_a_page_is_claimed_once_and_sessions_round_trip(store: Sessions) -> None:
    behaviour = SessionBehaviour(2, 1, 3, 1, 0, 12.5, 1.5, 30.0, [12.5, 0.0], [0.0, 0.5, 1.0], 3)
    state = SessionState(
        session_id=41, user_id=7, step=3, history=[5, 6], behaviour=behaviour, served_by={"v1": 2, "v2": 1}
    )
    store.save(state)
    assert store.session(41) == state
    page = _page("r1", state)
    store.add_page(page)
    assert store.page("r1") == page
    assert store.claim("r1") and not store.claim("r1")
    assert store.page("r1") is None
    ending = store.update(41, "r1", lambda current: (replace(current or state, step=4), True))
    assert ending == (replace(state, step=4, counted=["r1"]), True)
    assert store.ended(41) and store.session(41) is None and not store.ended(42)
    assert store.update(41, "r2", lambda current: (state, False)) is None  # ended without r2: nothing written
    assert store.update(41, "r1", lambda current: (state, False)) == ending  # r1 again: its ending, unchanged
    assert store.session(41) is None


def test_a_page_is_counted_once_in_its_session(store: Sessions) -> None:
    """The same page's feedback applied again (a transaction tried again after its commit went through) leaves the
    session as it was."""
    state = SessionState(session_id=43, user_id=7)
    store.save(state)

    def step(current: SessionState | None) -> tuple[SessionState, bool]:
        before = current or state
        return replace(before, step=before.step + 1), False

    first = store.update(43, "p1", step)
    assert first is not None and first[0].step == 1 and first[0].counted == ["p1"]
    assert store.update(43, "p1", step) == first and store.session(43) == first[0]
    assert store.update(43, "p2", step) == (replace(first[0], step=2, counted=["p1", "p2"]), False)


def test_a_redis_update_that_ended_the_session_is_answered_again(redis_address: str) -> None:
    """The page whose feedback ended the session is answered with the final state if its update is tried again;
    any other page of the session finds it ended."""
    store = RedisSessions(redis_address)
    state = SessionState(session_id=44, user_id=7)
    store.save(state)
    ending = store.update(44, "last", lambda current: (replace(current or state, step=1), True))
    assert ending is not None and ending[1]
    assert store.update(44, "last", lambda current: (state, False)) == ending
    assert store.update(44, "other", lambda current: (state, False)) is None


def test_an_ended_marker_of_the_earlier_format_still_ends_the_session(
    redis_address: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Markers written before they held the final state (the value 1) keep their meaning, without a warning."""
    import redis

    store = RedisSessions(redis_address)
    host, port = redis_address.split(":")
    redis.Redis(host=host, port=int(port)).set(f"{KEY_PREFIX}ended:46", b"1")
    state = SessionState(session_id=46, user_id=7)
    assert store.ended(46)
    assert store.update(46, "p", lambda current: (state, False)) is None
    assert store.session(46) is None and not caplog.records


def test_a_redis_update_gives_up_under_endless_contention(redis_address: str) -> None:
    """A session that another writer changes between every read and commit is a 503 after a bounded number of
    tries, not a request that spins; an error inside the change itself is not the store's."""
    import redis

    store = RedisSessions(redis_address)
    host, port = redis_address.split(":")
    other = redis.Redis(host=host, port=int(port))
    state = SessionState(session_id=45, user_id=7)
    store.save(state)
    tries = []

    def contended(current: SessionState | None) -> tuple[SessionState, bool]:
        tries.append(1)
        other.set(f"{KEY_PREFIX}session:45", json.dumps(asdict(state)))  # the watched key changes under us
        return state, False

    with pytest.raises(SessionStoreUnavailable, match=f"not updated in {MAX_TRANSACTION_ATTEMPTS} attempts"):
        store.update(45, "p", contended)
    assert len(tries) == MAX_TRANSACTION_ATTEMPTS

    def broken(current: SessionState | None) -> tuple[SessionState, bool]:
        raise KeyError("a bug in the change")

    with pytest.raises(KeyError, match="a bug in the change"):
        store.update(45, "p", broken)


def test_concurrent_updates_of_a_session_all_count(store: Sessions, request: pytest.FixtureRequest) -> None:
    """Feedback on several pages of one session answered at once, by threads of a replica and by two replicas
    (two Redis clients): each read-modify-write sees the others' writes, so no step is lost."""
    state = SessionState(session_id=77, user_id=7)
    store.save(state)
    other = (
        RedisSessions(request.getfixturevalue("redis_address")) if isinstance(store, RedisSessions) else store
    )
    stores = [store, other]

    def step(current: SessionState | None) -> tuple[SessionState, bool]:
        before = current or state
        time.sleep(0.0005)  # widen the window between the read and the write
        return replace(before, step=before.step + 1, history=[*before.history, before.step]), False

    def replica(k: int) -> None:
        for i in range(25):
            assert stores[k % 2].update(77, f"r{k}-{i}", step) is not None

    threads = [threading.Thread(target=replica, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    final = store.session(77)
    assert final is not None and final.step == 100 and final.history == list(range(100))


def test_a_malformed_redis_record_is_treated_as_absent(redis_address: str) -> None:
    import redis

    store = RedisSessions(redis_address)
    host, port = redis_address.split(":")
    redis.Redis(host=host, port=int(port)).set(f"{KEY_PREFIX}page:bad", b"{not json")
    assert store.page("bad") is None


@pytest.mark.parametrize(
    "spoil",
    [
        {"step": 10**20},
        {"history": [-5]},
        {"watch_time_s": float("inf")},
        {"user_id": 2**64},
        {"served_by": {"v1": -1}},
        {"served_by": {'v1",le="+Inf': 1}},  # a version that is no version: it would become a metric label
        {"served_by": {f"v{i}": 1 for i in range(9)}},  # more versions than a session lives through
    ],
)
def test_a_redis_record_out_of_range_is_treated_as_absent(redis_address: str, spoil: dict[str, Any]) -> None:
    """Strictly typed is not enough: a stored integer past int64 (torch would raise on it: a 500 on every request
    of the session), a negative item or an infinite watch time is a malformed record, logged and absent."""
    import redis

    store = RedisSessions(redis_address)
    host, port = redis_address.split(":")
    record = asdict(SessionState(session_id=4242, user_id=3, history=[1, 2])) | spoil
    redis.Redis(host=host, port=int(port)).set(f"{KEY_PREFIX}session:4242", json.dumps(record))
    assert store.session(4242) is None


def test_an_unreachable_redis_is_one_named_error() -> None:
    store = RedisSessions("127.0.0.1:1")
    with pytest.raises(SessionStoreUnavailable, match="session store"):
        store.session(1)


def test_the_environment_selects_the_store() -> None:
    assert isinstance(open_sessions({}), LocalSessions)
    with pytest.raises(ValueError, match="UNEXRL_REDIS"):
        open_sessions({"UNEXRL_SESSION_STORE": "redis"})
    with pytest.raises(ValueError, match="local or redis"):
        open_sessions({"UNEXRL_SESSION_STORE": "memcached"})
    assert _redis_options("redis-0.redis:6379,password=s3cret,ssl=true,socket_timeout=1") == {
        "host": "redis-0.redis",
        "port": 6379,
        "password": "s3cret",
        "ssl": True,
        "socket_timeout": 0.5,
        "socket_connect_timeout": 0.25,
    }
    with pytest.raises(ValueError, match="host:port"):
        _redis_options("no-port")


def test_a_redis_record_of_the_wrong_types_is_treated_as_absent(redis_address: str) -> None:
    """A record that parses as JSON but not as the declared types (written by anything that can reach the store) is
    ignored like unparsable JSON, not passed on to fail inside a request."""
    import redis

    store = RedisSessions(redis_address)
    state = SessionState(session_id=5, user_id=3, history=[1])
    host, port = redis_address.split(":")
    raw = redis.Redis(host=host, port=int(port))
    for name, value in (
        ("served_at", "now"),
        ("items", "abc"),
        ("session", {**asdict(state), "history": ["a"]}),
        ("model_version", "no version"),
    ):
        raw.set(f"{KEY_PREFIX}page:typed", json.dumps(asdict(_page("typed", state)) | {name: value}))
        assert store.page("typed") is None, name
    raw.set(f"{KEY_PREFIX}session:5", json.dumps(asdict(state) | {"step": "3"}))
    assert store.session(5) is None


@pytest.fixture(scope="module")
def engine(cem_artifact: Path, small_cfg: Config, tmp_path_factory: pytest.TempPathFactory) -> Recommender:
    """The serving engine in this process with the process's session store; no feature store (defaults)."""
    missing = str(tmp_path_factory.mktemp("engine") / "no-feature-store")
    cfg = small_cfg.model_copy(update={"features": small_cfg.features.model_copy(update={"repo": missing})})
    return Recommender(cfg, cem_artifact, sessions=LocalSessions())


def test_every_page_of_a_session_counts_in_it(engine: Recommender) -> None:
    """A client that asks for the next page before giving the first page's feedback (prefetching): both pages
    belong to the session, the second shows none of the first's items, and each feedback adds to the session as it
    is then, not as it was at serving."""
    first = engine.recommend(7)
    second = engine.recommend(7, first.session.session_id)
    assert second.session.session_id == first.session.session_id and second.session.step == 0
    assert set(second.items).isdisjoint(first.items)
    engine.feedback(
        first.request_id,
        first.session.session_id,
        [FeedbackItem(item_id=first.items[0], watch_time_s=1.0)],
        False,
    )
    result = engine.feedback(
        second.request_id,
        first.session.session_id,
        [FeedbackItem(item_id=second.items[0], watch_time_s=2.0)],
        False,
    )
    assert (result.session.step, result.session.items_watched, result.session.watch_time_s) == (2, 2, 3.0)
    assert result.session.history[-2:] == [first.items[0], second.items[0]]
    assert engine.sessions.pending(first.session.session_id) == frozenset()  # both answered: nothing left out


def _counted(name: str, version: str) -> float:
    return REGISTRY.get_sample_value(name, {"model_version": version}) or 0.0


def test_a_sessions_reward_is_shared_by_the_models_that_chose_its_pages(
    engine: Recommender, tmp_path: Path
) -> None:
    """During a canary any replica serves any page of a session and receives any feedback. Each page's feedback is
    recorded under the version that chose the page, and the ended session under the versions of its pages, each by
    its share of them: not all under the replica that received the last feedback, which would make both sides'
    rewards the same mix of both models' sessions."""
    store = LocalSessions()
    stable, canary = _with_sessions(engine, store), _canary(engine, store, tmp_path)
    names = ("unexrl_sessions_ended_total", "unexrl_session_watch_time_seconds_total")
    before = {(n, r.version): _counted(n, r.version) for n in names for r in (stable, canary)}
    watched = {r.version: _observations(ITEM_WATCH_TIME, r.version) for r in (stable, canary)}
    first = stable.recommend(11)
    session = first.session.session_id
    pages = [first, canary.recommend(11, session), stable.recommend(11, session)]
    for i, (page, receiver) in enumerate(zip(pages, (canary, stable, canary))):  # each on the other side
        item = FeedbackItem(item_id=page.items[0], watch_time_s=float(2**i))
        result = receiver.feedback(page.request_id, session, [item], session_end=i == 2)
    assert result.ended and result.session.served_by == {stable.version: 2, canary.version: 1}
    for version, share in ((stable.version, 2 / 3), (canary.version, 1 / 3)):
        ended, watch = (_counted(n, version) - before[n, version] for n in names)
        assert ended == pytest.approx(share) and watch == pytest.approx(share * 7.0)
    assert _observations(ITEM_WATCH_TIME, stable.version) == watched[stable.version] + 2
    assert _observations(ITEM_WATCH_TIME, canary.version) == watched[canary.version] + 1


def test_versions_past_a_replicas_label_bound_are_counted_as_other(engine: Recommender) -> None:
    """The versions stored pages and sessions name become metric labels: past a replica's bound they count under
    OTHER_VERSION (which no replica serves), so what the session store holds cannot grow its series without end;
    the session itself keeps the version."""
    store = LocalSessions()
    served = _with_sessions(engine, store)
    served.version_label = VersionLabels([engine.version], limit=1)
    page = served.recommend(14)
    store.add_page(replace(page, model_version="r-stored"))
    before = _counted("unexrl_sessions_ended_total", OTHER_VERSION)
    item = FeedbackItem(item_id=page.items[0], watch_time_s=1.0)
    result = served.feedback(page.request_id, page.session.session_id, [item], True)
    assert result.session.served_by == {"r-stored": 1}
    assert _counted("unexrl_sessions_ended_total", OTHER_VERSION) - before == 1
    assert _counted("unexrl_sessions_ended_total", "r-stored") == 0
    assert served.version_label(engine.version) == engine.version


def test_a_session_past_the_versions_it_may_name_stays_readable(engine: Recommender, store: Sessions) -> None:
    """A session whose pages were chosen by more versions than a stored record may name (many rollouts within
    its life) drops its least-served other version as it counts the next page: written so, it reads back, rather
    than as a malformed record that would lose the session."""
    served = _with_sessions(engine, store)
    page = served.recommend(13)
    session = page.session.session_id
    earlier = {f"r{i}": 1 + (i != 3) for i in range(MAX_VERSIONS_PER_SESSION)}  # r3 chose the fewest pages
    store.save(replace(store.session(session) or page.session, served_by=earlier))
    item = FeedbackItem(item_id=page.items[0], watch_time_s=1.0)
    result = served.feedback(page.request_id, session, [item], False)
    kept = {v: n for v, n in earlier.items() if v != "r3"} | {engine.version: 1}
    assert result.session.served_by == kept
    stored = store.session(session)
    assert stored is not None and stored.served_by == kept and stored.step == result.session.step


def test_a_page_stored_before_pages_named_their_model_is_the_receivers(
    engine: Recommender, tmp_path: Path
) -> None:
    """A page a replica of an earlier release stored (no model version) is credited to the replica that receives
    its feedback, as every page was before."""
    store = LocalSessions()
    stable, canary = _with_sessions(engine, store), _canary(engine, store, tmp_path)
    page = stable.recommend(12)
    store.add_page(replace(page, model_version=None))
    result = canary.feedback(
        page.request_id,
        page.session.session_id,
        [FeedbackItem(item_id=page.items[0], watch_time_s=1.0)],
        True,
    )
    assert result.session.served_by == {canary.version: 1}


def test_records_of_the_release_before_are_read_with_defaults(redis_address: str) -> None:
    """A session or page stored by a replica of the release before (no served_by, no model_version) is read, not
    dropped as malformed: a rollout keeps its sessions."""
    import redis

    store = RedisSessions(redis_address)
    state = SessionState(session_id=4601, user_id=3, step=1)
    host, port = redis_address.split(":")
    raw = redis.Redis(host=host, port=int(port))
    raw.set(
        f"{KEY_PREFIX}session:4601", json.dumps({k: v for k, v in asdict(state).items() if k != "served_by"})
    )
    assert store.session(4601) == state
    page = {k: v for k, v in asdict(_page("old", state)).items() if k != "model_version"}
    raw.set(f"{KEY_PREFIX}page:old", json.dumps(page))
    stored = store.page("old")
    assert stored is not None and stored.model_version is None


def _canary(engine: Recommender, store: Sessions, tmp_path: Path) -> Recommender:
    """Another model version (the greedy weights) serving from ``store`` beside the module's engine."""
    cfg = engine.cfg
    greedy = save_weight_policy(
        WeightPolicy(greedy_weights(cfg.cascade), cfg.cascade), tmp_path / "greedy", cfg, "greedy"
    )
    canary = Recommender(cfg, greedy, sessions=store, role="canary")
    assert canary.version != engine.version
    return canary


def test_a_sessions_pending_items_follow_its_pages(store: Sessions) -> None:
    """A page's items are pending from its serving to its claim, and none once its session ends."""
    state = SessionState(session_id=4401, user_id=7)
    store.save(state)
    store.add_page(_page("a", state))
    store.add_page(replace(_page("b", state), items=[2, 3]))
    assert store.pending(4401) == {1, 2, 3} and store.pending(4402) == frozenset()
    assert store.claim("a") and store.pending(4401) == {3}  # 2 is a's too: answered with it
    assert store.update(4401, "a", lambda current: (replace(current or state, step=1), True)) is not None
    assert store.pending(4401) == frozenset()


def test_pending_items_of_another_type_are_ignored(redis_address: str) -> None:
    """A pending key that is not a set (written by something else) loses the session nothing but its pending
    items: the page is stored and claimed, and later pages leave nothing out, with no 503."""
    import redis

    store = RedisSessions(redis_address)
    host, port = redis_address.split(":")
    redis.Redis(host=host, port=int(port)).set(f"{KEY_PREFIX}pending:4403", b"not a set")
    state = SessionState(session_id=4403, user_id=7)
    store.add_page(_page("c", state))
    assert store.page("c") is not None and store.pending(4403) == frozenset()
    assert store.claim("c")


@pytest.fixture(scope="module")
def live_engine(cem_artifact: Path, small_cfg: Config, logged_store: tuple[Path, Path]) -> Recommender:
    """The serving engine on a materialised local feature store (SQLite), with the process's session store."""
    features = small_cfg.features.model_copy(update={"repo": str(logged_store[1])})
    return Recommender(
        small_cfg.model_copy(update={"features": features}), cem_artifact, sessions=LocalSessions()
    )


def _user_features(engine: Recommender, monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """The user features the engine hands the model, request by request from now on."""
    seen: list[torch.Tensor] = []
    observe = engine.sim.observe

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs["user_features"])
        return observe(*args, **kwargs)

    monkeypatch.setattr(engine.sim, "observe", spy)
    return seen


class _Viewed(NamedTuple):
    item: int
    duration: float
    fraction: float
    click: bool
    like: bool

    @property
    def watch(self) -> float:
        return self.duration * self.fraction


def test_a_sessions_later_requests_read_its_answered_pages(
    live_engine: Recommender, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The user features of a session's later requests are the store's row as of its start with its answered
    pages added in the order their feedback came (a prefetched page answered first), as training's rows are
    (docs/features.md); the row alone would leave the pages out."""
    engine, cfg, world = live_engine, live_engine.cfg, live_engine.sim.world
    user = _with_history(engine)
    row = engine.features.fetch(user, []).user
    seen = _user_features(engine, monkeypatch)
    first = engine.recommend(user)
    session = first.session.session_id
    second = engine.recommend(user, session)  # asked for before the first page's feedback
    pages = [(second, second.items[:2], 0.5, True, False), (first, first.items[:1], 0.25, False, True)]
    for page, items, share, click, like in pages:
        duration = [float(world.item_duration[i]) for i in items]
        answers = [
            FeedbackItem(item_id=i, watch_time_s=d * share, click=click, like=like)
            for i, d in zip(items, duration)
        ]
        engine.feedback(page.request_id, session, answers, False)
    engine.recommend(user, session)

    def was(name: str) -> Any:
        return row[f"user_behaviour__{name}"]

    viewed = [
        _Viewed(i, float(world.item_duration[i]), share, click, like)
        for _, items, share, click, like in pages
        for i in items
    ]
    views = was("items_viewed") + len(viewed)
    watch = was("watch_time_s") + sum(v.watch for v in viewed)
    category = [x * was("watch_time_s") for x in was("category_watch_share")]
    for v in viewed:
        category[int(world.item_category[v.item])] += v.watch
    recent = [*was("recent_watch_fractions"), *(v.fraction for v in viewed)][-cfg.features.recent_items :]

    def mean(name: str, added: float) -> float:
        return (was(name) * was("items_viewed") + added) / views

    after = {
        "requests": was("requests") + 2,
        "sessions": was("sessions") + 1,
        "items_viewed": views,
        "watch_time_s": watch,
        "mean_watch_time_s": watch / views,
        "mean_watch_fraction": mean("mean_watch_fraction", sum(v.fraction for v in viewed)),
        "mean_viewed_duration_s": mean("mean_viewed_duration_s", sum(v.duration for v in viewed)),
        "click_rate": mean("click_rate", sum(v.click for v in viewed)),
        "like_rate": mean("like_rate", sum(v.like for v in viewed)),
        "recent_watch_fraction": sum(recent) / len(recent),
        "category_watch_share": [c / watch for c in category],
    }
    assert torch.equal(seen[0], served_inputs(row, cfg)) and torch.equal(seen[1], seen[0])
    expected = user_inputs({f"user_behaviour__{k}": [v] for k, v in after.items()}, cfg)
    torch.testing.assert_close(seen[2], expected)
    assert not torch.allclose(seen[2], seen[0])


def test_a_users_next_session_starts_from_the_pages_of_the_last(
    live_engine: Recommender, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each feedback pushes the user's behaviour row with the session's pages added (the row a materialisation of
    the logs up to that page would write), so the user's next session reads them without a materialisation."""
    engine, cfg, world = live_engine, live_engine.cfg, live_engine.sim.world
    user = _with_history(engine)
    before = engine.features.fetch(user, []).user
    seen = _user_features(engine, monkeypatch)
    first = engine.recommend(user)
    viewed = first.items[:3]
    answers = [
        FeedbackItem(item_id=i, watch_time_s=0.5 * float(world.item_duration[i]), click=True) for i in viewed
    ]
    pushes: list[tuple[Any, ...]] = []
    push = engine.features.push
    monkeypatch.setattr(engine.features, "push", lambda *args: pushes.append(args) or push(*args))
    result = engine.feedback(first.request_id, first.session.session_id, answers, True)
    totals = result.session.behaviour
    # stamped when the page was served: before the build's row of that page (its feedback), which replaces it
    ((pushed_user, at, _),) = [args[1:] for args in pushes if args[0] is fs.USER_BEHAVIOUR]
    assert (pushed_user, at) == (user, datetime.fromtimestamp(first.served_at, UTC))
    assert result.ended and result.pushed and totals is not None
    row = engine.features.fetch(user, []).user
    assert row["user_behaviour__requests"] == before["user_behaviour__requests"] + 1
    assert row["user_behaviour__sessions"] == before["user_behaviour__sessions"] + 1
    assert row["user_behaviour__recent_item_ids"][-3:] == viewed
    assert row["user_behaviour__recent_category_ids"][-3:] == world.item_category[viewed].tolist()
    second = engine.recommend(user)
    assert second.session.session_id != first.session.session_id
    torch.testing.assert_close(seen[1], totals.inputs(cfg))
    assert torch.equal(seen[1], served_inputs(row, cfg)) and not torch.allclose(seen[1], seen[0])


def test_a_stored_row_of_another_shape_is_served_degraded(
    live_engine: Recommender, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user_behaviour row the served config cannot read (a store built for another ``world.n_categories``) is
    a degraded page from the defaults, counted as a `mismatched` fallback, not a 500."""
    engine, cfg = live_engine, live_engine.cfg
    user = _with_history(engine)
    row = engine.features.fetch(user, []).user
    wrong = {f.name: row[f"user_behaviour__{f.name}"] for f in fs.USER_BEHAVIOUR.features} | {
        "category_watch_share": [1.0 / 3] * 3
    }
    before = REGISTRY.get_sample_value("unexrl_feature_store_fallbacks_total", {"reason": "mismatched"})
    seen = _user_features(engine, monkeypatch)
    assert engine.features.push(fs.USER_BEHAVIOUR, user, datetime.now(UTC), wrong)
    try:
        page = engine.recommend(user)
    finally:  # the store is the module's: give the user its row back
        kept = {name: row[f"user_behaviour__{name}"] for name in wrong}
        assert engine.features.push(fs.USER_BEHAVIOUR, user, datetime.now(UTC), kept)
    after = REGISTRY.get_sample_value("unexrl_feature_store_fallbacks_total", {"reason": "mismatched"})
    assert page.degraded and page.session.behaviour is None and after == before + 1
    assert torch.equal(seen[0], cold_inputs(1, cfg))


@pytest.mark.parametrize(
    "spoil",
    [
        lambda b: replace(b, recent=b.recent[:3]),  # another deployment's recent window
        lambda b: replace(b, watch=float("nan")),
        lambda b: replace(b, requests=2**70),  # past int64: Redis's strict parse lets it through
        lambda b: replace(b, category_watch=[-1.0, *b.category_watch[1:]]),
    ],
    ids=["another-shape", "nan", "past-int64", "negative"],
)
def test_stored_totals_that_cannot_be_served_are_not_used(
    live_engine: Recommender,
    monkeypatch: pytest.MonkeyPatch,
    spoil: Callable[[SessionBehaviour], SessionBehaviour],
) -> None:
    """A session record whose totals cannot be served (of another config's shape, written by a deployment that
    shares the session store; or values no page could give) is served from the store's row, and its feedback
    still counts: no error."""
    engine, user = live_engine, _with_history(live_engine)
    first = engine.recommend(user)
    session = first.session.session_id
    stored = engine.sessions.session(session)
    assert stored is not None and stored.behaviour is not None
    spoilt = replace(stored, behaviour=spoil(stored.behaviour))
    engine.sessions.save(spoilt)
    engine.sessions.add_page(replace(first, session=spoilt))
    answer = [FeedbackItem(item_id=first.items[0], watch_time_s=1.0)]
    assert engine.feedback(first.request_id, session, answer, False).session.behaviour is None
    seen = _user_features(engine, monkeypatch)
    engine.recommend(user, session)
    assert torch.equal(seen[0], served_inputs(engine.features.fetch(user, []).user, engine.cfg))


def _with_history(engine: Recommender) -> int:
    """A user whose behaviour row in the engine's feature store has requests."""
    users = range(engine.sim.world.n_users)
    return next(u for u in users if engine.features.fetch(u, []).user["user_behaviour__requests"])


def test_a_session_started_without_the_store_reads_the_stores_row(
    engine: Recommender, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session that starts while the feature store is unreachable has no row to add its pages to: its requests
    read the store's row (here, unreachable throughout: the defaults) rather than carry cold totals."""
    seen = _user_features(engine, monkeypatch)
    first = engine.recommend(9)
    answers = [FeedbackItem(item_id=first.items[0], watch_time_s=1.0, click=True)]
    engine.feedback(first.request_id, first.session.session_id, answers, False)
    engine.recommend(9, first.session.session_id)
    assert first.degraded and first.session.behaviour is None
    assert torch.equal(seen[0], cold_inputs(1, engine.cfg)) and torch.equal(seen[1], seen[0])


def test_a_request_times_each_of_its_steps(engine: Recommender) -> None:
    """The stage latency histogram has the session store's reads as a step of their own, apart from retrieval."""
    steps = ("features", "session", "retrieval", *engine.stage_names)

    def counts() -> list[float]:
        labels = [{"model_version": engine.version, "stage": step} for step in steps]
        return [REGISTRY.get_sample_value("unexrl_stage_latency_seconds_count", x) or 0.0 for x in labels]

    before = counts()
    engine.recommend(12)
    assert [a - b for a, b in zip(counts(), before)] == [1.0] * len(steps)


def test_a_stored_page_outside_the_catalogue_is_an_unknown_page(engine: Recommender) -> None:
    """A pending page whose items are not in the catalogue (the store's record was altered) is refused as unknown,
    not indexed into the item table."""
    page = engine.recommend(8)
    bad = engine.sessions.page(page.request_id)
    assert bad is not None
    engine.sessions.add_page(replace(bad, items=[10**9, *bad.items[1:]]))
    with pytest.raises(UnknownRequest, match="request_id"):
        engine.feedback(
            page.request_id, page.session.session_id, [FeedbackItem(item_id=10**9, watch_time_s=1.0)], False
        )


class _FailingOnce(LocalSessions):
    """The process's store, whose next update fails as an unreachable Redis does."""

    fail_next = False

    def update(self, *args: Any, **kwargs: Any) -> tuple[SessionState, bool] | None:
        if self.fail_next:
            self.fail_next = False
            raise SessionStoreUnavailable("session store: ConnectionError: unreachable")
        return super().update(*args, **kwargs)


def test_feedback_answered_503_is_counted_once_when_retried(engine: Recommender) -> None:
    """A 503 tells the client to try again: the page is still there for the retry, which counts it once, and a
    second delivery of the same feedback is refused without counting it again or recording its metrics."""
    store = _FailingOnce()
    engine_with_store = _with_sessions(engine, store)
    page = engine_with_store.recommend(9)
    feedback = [FeedbackItem(item_id=page.items[0], watch_time_s=3.0)]
    store.fail_next = True
    with pytest.raises(SessionStoreUnavailable):
        engine_with_store.feedback(page.request_id, page.session.session_id, feedback, False)
    watched = _observations(ITEM_WATCH_TIME, engine.version)
    result = engine_with_store.feedback(page.request_id, page.session.session_id, feedback, False)
    assert (result.session.step, result.session.watch_time_s) == (1, 3.0)
    assert _observations(ITEM_WATCH_TIME, engine.version) == watched + 1
    with pytest.raises(UnknownRequest, match="already received"):
        engine_with_store.feedback(page.request_id, page.session.session_id, feedback, False)
    assert _observations(ITEM_WATCH_TIME, engine.version) == watched + 1
    state = store.session(page.session.session_id)
    assert state is not None and (state.step, state.counted) == (1, [page.request_id])
    assert state.served_by == {engine.version: 1}


class _OtherDeliveryClaimsFirst(LocalSessions):
    """The process's store, in which another delivery of the same feedback claims the page between this one's
    update and its claim (two replicas racing on one feedback)."""

    def update(self, session_id: int, request_id: str, change: Any) -> tuple[SessionState, bool] | None:
        outcome = super().update(session_id, request_id, change)
        assert super().update(session_id, request_id, change) == outcome  # the other delivery: counted once
        assert self.claim(request_id)
        return outcome


def test_of_two_deliveries_of_one_feedback_only_the_claimer_records_it(engine: Recommender) -> None:
    store = _OtherDeliveryClaimsFirst()
    racing = _with_sessions(engine, store)
    page = racing.recommend(10)
    watched = _observations(ITEM_WATCH_TIME, engine.version)
    with pytest.raises(UnknownRequest, match="already received"):
        racing.feedback(
            page.request_id,
            page.session.session_id,
            [FeedbackItem(item_id=page.items[0], watch_time_s=1.0)],
            False,
        )
    assert _observations(ITEM_WATCH_TIME, engine.version) == watched  # the claimer records it, not this one
    state = store.session(page.session.session_id)
    assert state is not None and (state.step, state.counted) == (1, [page.request_id])
    assert state.served_by == {engine.version: 1}


def _with_sessions(engine: Recommender, store: Sessions) -> Recommender:
    """The module's engine (its policy and world) with another session store, without loading it again."""
    other = copy.copy(engine)
    other.sessions = store
    return other


def _observations(histogram: Histogram, version: str) -> float:
    """How many observations ``histogram`` has for ``version`` (prometheus_client's exposition)."""
    for metric in histogram.collect():
        for sample in metric.samples:
            if sample.name.endswith("_count") and sample.labels.get("model_version") == version:
                return sample.value
    return 0.0


def test_the_process_store_counts_what_its_bound_drops(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past its bound the process's store drops the oldest pages; each one dropped is counted, not lost unseen."""
    from unexrl.serve import sessions

    monkeypatch.setattr(sessions, "MAX_PENDING_PAGES", 2)
    store = LocalSessions()
    evicted = {"name": "unexrl_session_store_evictions_total", "labels": {"record": "page"}}
    before = REGISTRY.get_sample_value(**evicted)
    state = SessionState(session_id=44, user_id=7)
    for request_id in ("a", "b", "c"):
        store.add_page(_page(request_id, state))
    assert store.page("a") is None and store.page("c") is not None
    assert REGISTRY.get_sample_value(**evicted) == before + 1
