"""The session store: the process's and Redis's behave alike (a page claimed once, ended sessions void, malformed
records ignored), and a Redis that cannot be reached is one named error."""

from __future__ import annotations

import pytest

from unexrl.serve.sessions import (
    KEY_PREFIX,
    LocalSessions,
    Page,
    RedisSessions,
    Sessions,
    SessionState,
    SessionStoreUnavailable,
    _redis_options,
    open_sessions,
)


def _page(request_id: str, session: SessionState) -> Page:
    return Page(request_id, session.user_id, session, [1, 2], [[0.5]], [10], False, False, 1.0)


@pytest.fixture(params=["local", "redis"])
def store(request: pytest.FixtureRequest) -> Sessions:
    if request.param == "local":
        return LocalSessions()
    return RedisSessions(request.getfixturevalue("redis_address"))


def test_a_page_is_claimed_once_and_sessions_round_trip(store: Sessions) -> None:
    state = SessionState(session_id=41, user_id=7, step=3, history=[5, 6])
    store.save(state)
    assert store.session(41) == state
    store.add_page(_page("r1", state))
    assert store.page("r1") == _page("r1", state)
    assert store.claim("r1") and not store.claim("r1")
    assert store.page("r1") is None
    store.end(41)
    assert store.ended(41) and store.session(41) is None and not store.ended(42)


def test_a_malformed_redis_record_is_treated_as_absent(redis_address: str) -> None:
    import redis

    store = RedisSessions(redis_address)
    host, port = redis_address.split(":")
    redis.Redis(host=host, port=int(port)).set(f"{KEY_PREFIX}page:bad", b"{not json")
    assert store.page("bad") is None


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
