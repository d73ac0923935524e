"""Online features for serving: one call for a user and its candidates, and it never raises.

Fallbacks, so a request is always answered:
- cold start: the store has no row of a view for the user or an item (a new user or item, a session that
  expired): that view's features take the documented defaults (``unexrl.features.schema.defaults``).
- degraded: the store cannot be opened or read (Redis down, registry missing): every feature takes its
  default and ``degraded`` is set.
Both count into ``unexrl_feature_store_fallbacks_total{reason="cold_start"|"unreachable"}``: one per entity
(the user, each candidate) and view served from defaults. Feast and prometheus_client are serving
dependencies (the ``features`` extra); Feast is imported only when the store is first opened.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter

from unexrl.config import Config
from unexrl.features import schema as fs
from unexrl.features.store import open_store

if TYPE_CHECKING:
    from feast import FeatureService, FeatureStore

log = logging.getLogger(__name__)

FALLBACKS = Counter(
    "unexrl_feature_store_fallbacks_total",
    "Feature rows (one per entity and view) served from defaults instead of the feature store",
    ["reason"],
)
COLD_START = "cold_start"
UNREACHABLE = "unreachable"


@dataclass
class OnlineFeatures:
    """Features named ``<view>__<feature>`` as in the training set: user values, and per-candidate lists."""

    user: dict[str, Any]
    items: dict[str, list[Any]]
    cold_start: dict[str, int] = field(default_factory=dict)
    """rows served from defaults per view because the store had none"""
    degraded: bool = False
    """the store was unreachable: everything is defaults"""


class FeatureClient:
    """Reads the serving feature services of the configured environment; opens the store on first use."""

    def __init__(self, cfg: Config, store: FeatureStore | None = None) -> None:
        self._cfg = cfg
        self._store = store
        self._services: dict[str, FeatureService] = {}
        self._defaults = fs.defaults(cfg)

    def fetch(self, user_id: int, item_ids: Sequence[int]) -> OnlineFeatures:
        """The user's and every candidate's features, in ``item_ids`` order."""
        user_views, item_views = fs.SERVICES[fs.USER_SERVING_SERVICE], fs.SERVICES[fs.ITEM_SERVING_SERVICE]
        try:
            user_read = self._read(fs.USER_SERVING_SERVICE, fs.USER.join_key, [int(user_id)])
            items_read = self._read(fs.ITEM_SERVING_SERVICE, fs.ITEM.join_key, [int(i) for i in item_ids])
        except Exception as err:  # noqa: BLE001 - any store failure degrades to defaults, never to the caller
            log.warning("feature store unreachable, serving defaults: %s: %s", type(err).__name__, err)
            user, _ = self._filled(user_views, {}, 1)
            items, _ = self._filled(item_views, {}, len(item_ids))
            FALLBACKS.labels(reason=UNREACHABLE).inc(len(user_views) + len(item_views) * len(item_ids))
            return OnlineFeatures(user={k: v[0] for k, v in user.items()}, items=items, degraded=True)
        user, user_cold = self._filled(user_views, user_read, 1)
        items, item_cold = self._filled(item_views, items_read, len(item_ids))
        cold = {**user_cold, **item_cold}
        if sum(cold.values()):
            FALLBACKS.labels(reason=COLD_START).inc(sum(cold.values()))
        return OnlineFeatures(user={k: v[0] for k, v in user.items()}, items=items, cold_start=cold)

    def push_session(
        self,
        user_id: int,
        at: datetime,
        session_id: int,
        step: int,
        items_watched: int,
        watch_time_s: float,
        last_watch_fraction: float,
    ) -> bool:
        """Write the user's fresh session state to the online store; False (logged) if the store is down."""
        row = {
            fs.USER.join_key: [int(user_id)],
            fs.TIMESTAMP: [at],
            "session_id": [int(session_id)],
            "session_step": [int(step)],
            "session_items_watched": [int(items_watched)],
            "session_watch_time_s": [float(watch_time_s)],
            "last_watch_fraction": [float(last_watch_fraction)],
        }
        try:
            import pandas as pd
            from feast.data_source import PushMode

            self._open().push(fs.SESSION_PUSH_SOURCE, pd.DataFrame(row), to=PushMode.ONLINE)
        except Exception as err:  # noqa: BLE001 - a lost push only makes the session state stale
            log.warning("feature store push failed: %s: %s", type(err).__name__, err)
            return False
        return True

    def _open(self) -> FeatureStore:
        if self._store is None:
            self._store = open_store(self._cfg)
        return self._store

    def _read(self, service: str, key: str, ids: list[int]) -> dict[str, list[Any]]:
        store = self._open()
        if service not in self._services:
            self._services[service] = store.get_feature_service(service)
        if not ids:
            return {}
        response = store.get_online_features(
            features=self._services[service], entity_rows=[{key: i} for i in ids], full_feature_names=True
        )
        return response.to_dict()

    def _filled(
        self, views: tuple[fs.ViewSpec, ...], read: dict[str, list[Any]], n: int
    ) -> tuple[dict[str, list[Any]], dict[str, int]]:
        """Store values where a view has a row, its defaults where it has none, and the count defaulted per view.

        Every feature of a stored row is non-null, so a view's row is missing exactly when its first feature is.
        """
        out: dict[str, list[Any]] = {}
        cold: dict[str, int] = {}
        for view in views:
            names = [f"{view.name}__{f.name}" for f in view.features]
            missing = [v is None for v in read.get(names[0], [None] * n)]
            cold[view.name] = sum(missing)
            for feature, name in zip(view.features, names):
                default = self._defaults[view.name][feature.name]
                values = read.get(name, [None] * n)
                out[name] = [_copy(default) if gone else value for gone, value in zip(missing, values)]
        return out, cold


def _copy(value: Any) -> Any:
    """Defaults are shared: hand out copies of lists so a caller cannot change them."""
    return list(value) if isinstance(value, list) else value
