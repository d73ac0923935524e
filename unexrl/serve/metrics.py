"""The service's Prometheus metrics: one definition each, shared by the service, the rules and the dashboard.

Naming follows Prometheus conventions: ``unexrl_`` prefix, base units (seconds), ``_total`` counters, histograms
for distributions. Labels are bounded: ``model_version`` (one per deployed artifact, at most MAX_VERSION_LABELS per
replica), ``role`` (stable | canary | shadow), ``stage`` (cascade stage names and the fixed pre-cascade steps),
``dimension`` (a stage's heads); never user, session, request or item ids. The feature-store fallback counter
lives with the client that counts it (``unexrl.features.client.FALLBACKS``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from prometheus_client import Counter, Gauge, Histogram

OTHER_VERSION = "other"
"""the ``model_version`` label of feedback and sessions credited to a version past a replica's MAX_VERSION_LABELS"""
MAX_VERSION_LABELS = 16
"""model versions one replica labels its feedback and session metrics with: its own, its shadow's and those its
stored pages and sessions name (a version or two per rollout); a stored record decides the label, so the bound
keeps what the session store holds from growing the process's series without end"""


class VersionLabels:
    """The ``model_version`` label for a version a stored page or session names: itself while the replica has
    labelled fewer than ``limit`` versions (``known`` first), else OTHER_VERSION, which no replica serves (the
    recording rules drop it)."""

    def __init__(self, known: Iterable[str], limit: int = MAX_VERSION_LABELS) -> None:
        self._limit = limit
        self._labelled = set(known)
        self._lock = threading.Lock()

    def __call__(self, version: str) -> str:
        with self._lock:
            if version in self._labelled or len(self._labelled) < self._limit:
                self._labelled.add(version)
                return version
        return OTHER_VERSION


_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.004,
    0.006,
    0.008,
    0.012,
    0.016,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)
_WATCH_BUCKETS = (1, 2, 5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300)
_CANDIDATE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
_ACTION_BUCKETS = tuple(round(-1.0 + 0.2 * i, 1) for i in range(11))
_LAG_BUCKETS = (0.001, 0.01, 0.1, 0.5, 1, 5, 15, 30, 60, 120, 300, 900, 1800)
_RATIO_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)

MODEL_INFO = Gauge(
    "unexrl_model_info",
    "Loaded policy artifacts (value 1), by version and role",
    ["model_version", "role", "algorithm", "kind"],
    multiprocess_mode="max",
)
RECOMMEND_LATENCY = Histogram(
    "unexrl_recommend_latency_seconds",
    "Time to answer /recommend inside the service (features to page)",
    ["model_version"],
    buckets=_LATENCY_BUCKETS,
)
STAGE_LATENCY = Histogram(
    "unexrl_stage_latency_seconds",
    "Time per step of /recommend: features, session (its store's reads), retrieval (pool and stage predictions), "
    "then each cascade stage",
    ["model_version", "stage"],
    buckets=_LATENCY_BUCKETS,
)
STAGE_CANDIDATES = Histogram(
    "unexrl_stage_candidates",
    "Candidates each cascade stage ranks",
    ["model_version", "stage"],
    buckets=_CANDIDATE_BUCKETS,
)
STAGE_ACTION = Histogram(
    "unexrl_stage_action",
    "Action value per stage and dimension (fusion weight of one head), for drift",
    ["model_version", "role", "stage", "dimension"],
    buckets=_ACTION_BUCKETS,
)
COLD_START_REQUESTS = Counter(
    "unexrl_cold_start_requests_total",
    "Requests of users outside the model's id space, served cold",
    ["model_version"],
)
ITEM_WATCH_TIME = Histogram(
    "unexrl_item_watch_time_seconds",
    "Seconds watched per viewed item, from /feedback, under the version that chose its page",
    ["model_version"],
    buckets=_WATCH_BUCKETS,
)
# An ended session counts once in all, shared among the model versions that chose its pages in proportion to them
# (unexrl.serve.sessions.shares): the means per version are ratios of these counters' rates.
SESSIONS_ENDED = Counter(
    "unexrl_sessions_ended",
    "Sessions ended by /feedback, each shared among the model versions that chose its pages",
    ["model_version"],
)
SESSION_WATCH_TIME = Counter(
    "unexrl_session_watch_time_seconds",
    "Seconds watched in ended sessions, shared as sessions ended: the long-term reward",
    ["model_version"],
)
SESSION_ITEMS = Counter(
    "unexrl_session_items",
    "Items viewed in ended sessions, shared as sessions ended",
    ["model_version"],
)
SESSION_REQUESTS = Counter(
    "unexrl_session_requests",
    "Requests (pages) of ended sessions, shared as sessions ended",
    ["model_version"],
)
FEEDBACK_LAG = Histogram(
    "unexrl_feedback_lag_seconds",
    "Seconds from serving a page to receiving its feedback, under the version that chose the page",
    ["model_version"],
    buckets=_LAG_BUCKETS,
)
FEEDBACK_REJECTED = Counter(
    "unexrl_feedback_rejected_total",
    "Feedback refused (unknown_request, invalid) and requests naming a session that is not the user's open one "
    "(unknown_session), by reason",
    ["reason"],
)
SHADOW_OVERLAP = Histogram(
    "unexrl_shadow_page_overlap_ratio",
    "Share of the served page that the shadow model would also have shown",
    ["model_version", "shadow_version"],
    buckets=_RATIO_BUCKETS,
)
