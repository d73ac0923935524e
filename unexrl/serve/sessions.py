"""Where serving keeps open sessions and the pages that wait for feedback: in the process, or in Redis.

A page is served by one replica and its feedback may reach another; the next request of the session may reach a
third. With ``UNEXRL_SESSION_STORE=redis`` every replica reads and writes the same records on the online store's
Redis (``UNEXRL_REDIS``), so no session affinity is needed; the default, ``local``, keeps them in the process
(one replica, or sticky sessions). Records are keyed by the server-issued session id and request id (the Feast
``user_session`` view, keyed by user, is still pushed on every feedback: it is a feature, this is the state), and
expire after ``SESSION_TTL_S`` idle seconds like a session's feature row. A page's feedback first changes its
session in one read-modify-write (``Sessions.update``: a lock in the process, a WATCH/MULTI transaction in Redis,
tried again when another replica wrote the session in between), so feedback on two pages of a session, answered at
the same time on two replicas, both count; then it claims the page with one atomic GETDEL, so of several
deliveries of one feedback only one records its metrics. The session records which pages it counts, so a
transaction tried again after its commit's reply was lost, or a feedback retried after a 503, does not count a page
twice; an ended session keeps its final state for the same reason. The items of a session's unanswered pages are
kept too (``Sessions.pending``), so a page asked for before they are answered does not show them again.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Annotated, Any, Protocol, TypeVar

from prometheus_client import Counter
from pydantic import Field, TypeAdapter

from unexrl.contracts.release import VERSION
from unexrl.features.schema import SESSION_TTL_S
from unexrl.serve.api import INT64_MAX, INT64_MIN
from unexrl.serve.behaviour import SessionBehaviour

log = logging.getLogger(__name__)

ENV_SESSION_STORE = "UNEXRL_SESSION_STORE"
"""local (default) | redis: where sessions and pending pages live (docs/serving.md)"""
ENV_REDIS = "UNEXRL_REDIS"
"""the online store's Redis, ``host:port[,password=...][,ssl=true][,db=N]`` (Feast's connection string)"""
MAX_PENDING_PAGES = 100_000
MAX_CACHED_SESSIONS = 100_000
"""the process's store's bounds (``local``); past them the oldest records go, counted in EVICTIONS"""
EVICTIONS = Counter(
    "unexrl_session_store_evictions_total",
    "Records the process's session store dropped at its bound (page: a page still waiting for feedback)",
    ["record"],
)
for _record in ("page", "session", "ended_session", "pending"):
    EVICTIONS.labels(_record)  # exported at 0: no evictions is a rate of 0, not no data
MAX_TRANSACTION_ATTEMPTS = 20
"""Redis: how often a session's update is tried while other writers keep changing it, before a 503 (with a random
wait of up to 1 ms times the attempt between tries)"""
MAX_VERSIONS_PER_SESSION = 8
"""how many model versions a stored session may name (each one a metric label when it ends): a session lives at
most SESSION_TTL_S idle, during which a rollout or two may change the version; a record naming more is malformed"""
KEY_PREFIX = "unexrl:serving:"
_OLD_ENDED = b"1"
"""an ended session's marker as written before it held the final state"""
T = TypeVar("T")
Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
Index = Annotated[int, Field(ge=0, le=INT64_MAX)]
"""an id or count a stored record may hold: torch takes it as an int64"""
Finite = Annotated[float, Field(allow_inf_nan=False)]
Amount = Annotated[float, Field(ge=0, allow_inf_nan=False)]
ModelVersion = Annotated[str, Field(pattern=VERSION)]
"""a served artifact's version, as a stored record may name it (it becomes a metric label)"""


@dataclass
class SessionState:
    session_id: Index
    user_id: Int64
    step: Index = 0
    items_watched: Index = 0
    watch_time_s: Amount = 0.0
    last_watch_fraction: Amount = 0.5
    history: list[Index] = field(default_factory=list)
    """recently viewed item ids, oldest first, at most session.history_window"""
    touched: Finite = field(default_factory=time.time)
    """wall-clock time the session was issued or last had feedback (replicas share it)"""
    counted: list[str] = field(default_factory=list)
    """the request ids whose feedback the session counts (at most session.max_requests)"""
    behaviour: SessionBehaviour | None = None
    """the user's behaviour its requests read: the store's row at its start and its answered pages
    (unexrl/serve/behaviour.py; n_categories + 9 numbers and up to 2 x recent_items, in each pending page's copy
    too); None when the store was unreachable at its start, or in a record written before sessions kept it: its
    requests read the store's row"""
    served_by: Annotated[dict[ModelVersion, Index], Field(max_length=MAX_VERSIONS_PER_SESSION)] = field(
        default_factory=dict
    )
    """how many of its counted pages each model version chose: an ended session's reward is shared among them
    in proportion (:func:`shares`), whichever replica receives its feedback"""


@dataclass(frozen=True)
class Page:
    request_id: str
    user_id: Int64
    session: SessionState
    """the session as it was when the page was chosen"""
    items: list[Index]
    actions: list[list[Finite]]
    candidates: list[Index]
    """how many candidates each stage ranked"""
    cold_start: bool
    degraded: bool
    served_at: Finite
    """wall-clock time it was served"""
    model_version: ModelVersion | None = None
    """the version of the policy that chose it; None in a page stored before pages named it (its feedback is
    then credited to the replica that receives it)"""

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str | bytes) -> Page:
        """Parse a stored page, every field of its declared type (pydantic's strict mode): a record that says
        otherwise raises a ValueError, and the store treats it as absent."""
        return _PAGE.validate_json(text, strict=True)


def shares(served_by: dict[str, int]) -> dict[str, float]:
    """Each model version's share of a session: the fraction of its counted pages that version chose. A session
    served by one version is wholly that version's; one whose pages were routed to both sides of a canary counts
    for each in part, so neither side's reward is the other's."""
    total = sum(served_by.values())
    return {version: n / total for version, n in served_by.items() if n > 0}  # none when no page is counted


def served_once_more(served_by: dict[str, int], version: str) -> dict[str, int]:
    """``served_by`` with one more page chosen by ``version``, naming at most MAX_VERSIONS_PER_SESSION versions:
    past that (as many rollouts within one session), the version with the fewest pages other than ``version``
    leaves, and its pages count for none of the others' shares. A record naming more would be read back as
    malformed, and the whole session lost."""
    after = served_by | {version: served_by.get(version, 0) + 1}
    while len(after) > MAX_VERSIONS_PER_SESSION:
        del after[min((v for v in after if v != version), key=lambda v: after[v])]
    return after


_PAGE = TypeAdapter(Page)
_SESSION = TypeAdapter(SessionState)


Change = Callable[[SessionState | None], tuple[SessionState, bool]]
"""A page's feedback: (the stored open session, or None) -> (the session after it, whether it has ended). Pure: a
store may call it again when another writer got in first."""


def _count_once(
    current: SessionState | None, request_id: str, change: Change
) -> tuple[SessionState, bool, bool]:
    """(the session after page ``request_id``'s feedback, whether it ended, whether there is anything to write):
    ``current`` as it is if it already counts that page, else ``change`` applied and the page recorded."""
    if current is not None and request_id in current.counted:
        return current, False, False
    after, ended = change(current)
    return replace(after, counted=[*after.counted, request_id]), ended, True


class SessionStoreUnavailable(RuntimeError):
    """The shared session store cannot be read or written: the request cannot be answered correctly (a 503)."""


class Sessions(Protocol):
    """Open sessions, recently ended session ids, and served pages waiting for their feedback."""

    def session(self, session_id: int) -> SessionState | None:
        """The open session (None if unknown, ended or idle for SESSION_TTL_S)."""
        ...

    def save(self, state: SessionState) -> None: ...

    def update(self, session_id: int, request_id: str, change: Change) -> tuple[SessionState, bool] | None:
        """Count the feedback of page ``request_id`` in the session: ``change`` applied in one atomic
        read-modify-write and stored (an ended session is closed, its pending pages void). Returns the session
        after it and whether it has ended; the same if the session already counts that page (nothing written
        twice; the page that ended it is then the last one counted); None, writing nothing, if the session ended
        without it."""
        ...

    def ended(self, session_id: int) -> bool: ...

    def add_page(self, page: Page) -> None:
        """Keep the page for its feedback, and its items among its session's :meth:`pending` ones."""
        ...

    def page(self, request_id: str) -> Page | None:
        """A pending page, not claimed."""
        ...

    def pending(self, session_id: int) -> frozenset[int]:
        """The items of the session's pages still waiting for feedback: a page asked for before they are answered
        leaves them out, not to show them twice."""
        ...

    def claim(self, request_id: str) -> bool:
        """Take the page for its feedback (its items are no longer pending); False if another request took it
        first."""
        ...


class LocalSessions:
    """In this process: bounded tables (oldest evicted first) under one lock."""

    def __init__(self) -> None:
        self._pages: OrderedDict[str, Page] = OrderedDict()
        self._sessions: OrderedDict[int, SessionState] = OrderedDict()
        self._ended: OrderedDict[int, SessionState] = OrderedDict()
        """ended sessions' final states, as Redis's ended markers hold them"""
        self._pending: OrderedDict[int, frozenset[int]] = OrderedDict()
        self._lock = threading.Lock()

    def session(self, session_id: int) -> SessionState | None:
        with self._lock:
            return self._open(session_id)

    def save(self, state: SessionState) -> None:
        with self._lock:
            _bounded_put(self._sessions, state.session_id, state, MAX_CACHED_SESSIONS, "session", _touched)

    def update(self, session_id: int, request_id: str, change: Change) -> tuple[SessionState, bool] | None:
        with self._lock:
            if (
                final := self._ended.get(session_id)
            ) is not None:  # ended: by this page (counted before) or not
                return (final, True) if request_id in final.counted else None
            after, ended, write = _count_once(self._open(session_id), request_id, change)
            if write and ended:
                self._sessions.pop(session_id, None)
                self._pending.pop(session_id, None)
                _bounded_put(self._ended, session_id, after, MAX_CACHED_SESSIONS, "ended_session", _touched)
            elif write:
                _bounded_put(self._sessions, session_id, after, MAX_CACHED_SESSIONS, "session", _touched)
            return after, ended

    def _open(self, session_id: int) -> SessionState | None:
        state = self._sessions.get(session_id)
        return state if state is not None and time.time() - state.touched < SESSION_TTL_S else None

    def ended(self, session_id: int) -> bool:
        with self._lock:
            return session_id in self._ended

    def add_page(self, page: Page) -> None:
        with self._lock:
            _bounded_put(self._pages, page.request_id, page, MAX_PENDING_PAGES, "page", _served)
            sid = page.session.session_id
            items = self._pending.get(sid, frozenset()) | frozenset(page.items)
            _bounded_put(self._pending, sid, items, MAX_CACHED_SESSIONS, "pending")

    def pending(self, session_id: int) -> frozenset[int]:
        with self._lock:
            return self._pending.get(session_id, frozenset())

    def page(self, request_id: str) -> Page | None:
        with self._lock:
            page = self._pages.get(request_id)
            # expires as Redis's record does: late feedback does not bring an idle session back
            return page if page is not None and time.time() - page.served_at < SESSION_TTL_S else None

    def claim(self, request_id: str) -> bool:
        with self._lock:
            page = self._pages.pop(request_id, None)
            if page is None:
                return False
            sid = page.session.session_id
            if left := self._pending.get(sid, frozenset()) - frozenset(page.items):
                self._pending[sid] = left
            else:
                self._pending.pop(sid, None)
            return True


class RedisSessions:
    """In Redis, shared by every replica: JSON records with SESSION_TTL_S expiry."""

    def __init__(self, address: str) -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # one immediate retry of a dropped connection, not redis-py's default of three after up to 14 s: a request
        # waits on this store, and an unreachable store is a fast 503
        self._redis = redis.Redis(**_redis_options(address), retry=Retry(NoBackoff(), 1))
        self._redis_error, self._watch_error = redis.RedisError, redis.WatchError
        self._response_error = redis.ResponseError

    def session(self, session_id: int) -> SessionState | None:
        return _parsed_session(self._call("get", _key("session", session_id)), session_id)

    def save(self, state: SessionState) -> None:
        self._call("set", _key("session", state.session_id), json.dumps(asdict(state)), ex=int(SESSION_TTL_S))

    def update(self, session_id: int, request_id: str, change: Change) -> tuple[SessionState, bool] | None:
        key, ended_key = _key("session", session_id), _key("ended", session_id)
        for attempt in range(MAX_TRANSACTION_ATTEMPTS):
            try:
                with self._redis.pipeline() as pipe:
                    # from here reads run at once, and EXEC fails if either key changes
                    pipe.watch(key, ended_key)
                    # ended: by this page (a commit whose reply was lost) or by another
                    raw_final = pipe.get(ended_key)
                    if raw_final is not None:
                        final = None if raw_final == _OLD_ENDED else _parsed_session(raw_final, session_id)
                        return (final, True) if final is not None and request_id in final.counted else None
                    current = _parsed_session(pipe.get(key), session_id)
                    after, ended, write = _count_once(current, request_id, change)
                    if write:
                        pipe.multi()
                        if ended:
                            pipe.delete(key, _key("pending", session_id))
                            pipe.set(ended_key, json.dumps(asdict(after)), ex=int(SESSION_TTL_S))
                        else:
                            pipe.set(key, json.dumps(asdict(after)), ex=int(SESSION_TTL_S))
                        pipe.execute()
                    return after, ended
            except self._watch_error:
                # another writer got in, or the connection dropped while watching: a random wait spreads racers out
                time.sleep(random.uniform(0, 0.001 * (attempt + 1)))
            except self._redis_error as err:
                raise _unavailable(err) from None
        raise SessionStoreUnavailable(
            f"session store: session {session_id} not updated in {MAX_TRANSACTION_ATTEMPTS} attempts (other "
            "writers changed it each time, or the connection dropped while it was watched)"
        )

    def ended(self, session_id: int) -> bool:
        return bool(self._call("exists", _key("ended", session_id)))

    def add_page(self, page: Page) -> None:
        pending = _key("pending", page.session.session_id)
        # one round trip, MULTI/EXEC: the pending items never without their expiry
        pipe = self._redis.pipeline()
        pipe.set(_key("page", page.request_id), page.to_json(), ex=int(SESSION_TTL_S))
        if page.items:
            pipe.sadd(pending, *page.items)
            pipe.expire(pending, int(SESSION_TTL_S))
        for failed in (r for r in self._run(pipe) if isinstance(r, self._response_error)):
            # the page is stored; a pending key of another type (written by something else) only loses its items
            log.warning(
                "session store: session %d's pending items not kept: %s", page.session.session_id, failed
            )

    def page(self, request_id: str) -> Page | None:
        raw = self._call("get", _key("page", request_id))
        return _parsed(raw, Page.from_json, f"page {request_id!r}")

    def pending(self, session_id: int) -> frozenset[int]:
        try:
            members = self._call("smembers", _key("pending", session_id))
        except SessionStoreUnavailable as err:
            if not isinstance(err.__cause__, self._response_error):  # unreachable: the request cannot go on
                raise
            log.warning("session store: ignoring session %d's pending items: %s", session_id, err)
            return frozenset()  # not a set (written by something else): nothing left out
        items = frozenset(int(m) for m in members if m.isdigit() and int(m) < 2**63)
        if len(items) != len(members):
            log.warning("session store: ignoring malformed pending items of session %d", session_id)
        return items

    def claim(self, request_id: str) -> bool:
        raw = self._call("getdel", _key("page", request_id))
        page = _parsed(raw, Page.from_json, f"page {request_id!r}")
        if page is not None and page.items:
            try:  # the page is claimed: failing here must not turn its feedback into a 503 whose retry is a 404
                self._call("srem", _key("pending", page.session.session_id), *page.items)
            except SessionStoreUnavailable as err:
                log.warning("session store: page %r's items stay pending: %s", request_id, err)
        return raw is not None

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return getattr(self._redis, method)(*args, **kwargs)
        except self._redis_error as err:  # connection, timeout, auth, ...: the caller sees one kind
            raise _unavailable(err) from err

    def _run(self, pipe: Any) -> list[Any]:
        """A pipeline's replies, a command's error among them (the connection's raises)."""
        try:
            return pipe.execute(raise_on_error=False)
        except self._redis_error as err:
            raise _unavailable(err) from err


def _unavailable(err: Exception) -> SessionStoreUnavailable:
    return SessionStoreUnavailable(f"session store: {type(err).__name__}: {err}")


def open_sessions(environ: dict[str, str]) -> Sessions:
    """The session store the environment selects (UNEXRL_SESSION_STORE, UNEXRL_REDIS)."""
    kind = environ.get(ENV_SESSION_STORE, "local")
    if kind == "local":
        return LocalSessions()
    if kind != "redis":
        raise ValueError(f"{ENV_SESSION_STORE}={kind!r}: expected local or redis")
    if not environ.get(ENV_REDIS):
        raise ValueError(f"{ENV_SESSION_STORE}=redis needs {ENV_REDIS} (the online store's Redis)")
    return RedisSessions(environ[ENV_REDIS])


def _parsed(raw: bytes | None, parse: Callable[[bytes], T], what: str) -> T | None:
    """A stored record, or None when there is none or it does not parse (logged: never a 5xx for a bad record)."""
    if raw is None:
        return None
    try:
        return parse(raw)
    except (ValueError, TypeError, KeyError) as err:
        log.warning("session store: ignoring a malformed record of %s: %s", what, err)
        return None


def _parsed_session(raw: bytes | None, session_id: int) -> SessionState | None:
    return _parsed(raw, lambda text: _SESSION.validate_json(text, strict=True), f"session {session_id}")


def _key(kind: str, ident: int | str) -> str:
    return f"{KEY_PREFIX}{kind}:{ident}"


def _redis_options(address: str) -> dict[str, Any]:
    """redis.Redis keyword arguments from Feast's connection string (``host:port,key=value,...``)."""
    first, *options = [part.strip() for part in address.split(",") if part.strip()]
    host, _, port = first.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{ENV_REDIS}: expected host:port[,password=...], got {first!r}")
    out: dict[str, Any] = {
        "host": host,
        "port": int(port),
        "socket_timeout": 0.5,
        "socket_connect_timeout": 0.25,
    }
    for option in options:
        key, _, value = option.partition("=")
        if key in ("password", "username"):
            out[key] = value
        elif key == "ssl":
            out["ssl"] = value.lower() == "true"
        elif key == "db":
            out["db"] = int(value)
    return out


def _touched(state: SessionState) -> float:
    return state.touched


def _served(page: Page) -> float:
    return page.served_at


def _bounded_put(
    table: OrderedDict[Any, Any],
    key: Any,
    value: Any,
    limit: int,
    record: str,
    touched: Callable[[Any], float] | None = None,
) -> None:
    """Put ``key`` last. The oldest records idle for SESSION_TTL_S (``touched``: a record's last use) go first, as
    Redis expires them, uncounted; past ``limit`` the oldest go, counted (EVICTIONS) so that a bound reached is
    seen."""
    table[key] = value
    table.move_to_end(key)
    now = time.time()
    while table and touched is not None and now - touched(next(iter(table.values()))) >= SESSION_TTL_S:
        table.popitem(last=False)
    while len(table) > limit:
        table.popitem(last=False)
        EVICTIONS.labels(record).inc()
