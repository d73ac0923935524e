"""Online features for serving: one call for a user and its candidates, and it never raises.

The user's row is one online read of the user serving service (its ``user_session`` view only when the request
continues a session: a new session starts from the defaults by definition, not as a fallback); candidates come
from the process-local item cache (unexrl/features/cache.py), reloaded when a new materialisation is published.

A view with no row for the user or an item takes its documented defaults (``unexrl.features.schema.defaults``):
for an entity the store knows (it has the entity's profile row) these are the truth, not a fallback: no
complete feedback yet (counts 0, neutral fractions, the values the training set's nulls take too), or a session
that expired. Fallbacks, counted in ``unexrl_feature_store_fallbacks_total{reason}``, one per entity:
- ``cold_start``: the store has no profile row of the user or an item (an entity it has never seen): all of that
  entity's views are defaults.
- ``unreachable``: the store cannot be opened or read (Redis down, registry missing): the user (and every
  candidate, if the item cache never loaded) served from defaults; ``degraded`` is set. Candidates still come
  from the item cache once it has loaded.
Feast and prometheus_client are serving dependencies (the ``features`` extra); Feast is imported only when the
store is first opened.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml
from prometheus_client import Counter

from unexrl.config import Config
from unexrl.features import schema as fs
from unexrl.features.cache import ItemCache
from unexrl.features.published import ENV_FEAST_REGISTRY, SERVING, PublishedRegistry
from unexrl.features.store import open_store, store_yaml

if TYPE_CHECKING:
    from feast import FeatureService, FeatureStore

log = logging.getLogger(__name__)

FALLBACKS = Counter(
    "unexrl_feature_store_fallbacks_total",
    "Entities (users, candidates) whose features came from defaults: unknown to the store, it was unreachable, "
    "or its row did not fit the served config",
    ["reason"],
)
T = TypeVar("T")
COLD_START = "cold_start"
UNREACHABLE = "unreachable"
MISMATCHED = "mismatched"
"""the user's row has another config's shape (a store built for another ``world.n_categories``)"""
# exported at 0 from the start: a rate of no fallbacks is 0, not absent
for _reason in (COLD_START, UNREACHABLE, MISMATCHED):
    FALLBACKS.labels(reason=_reason)


@dataclass
class OnlineFeatures:
    """Features named ``<view>__<feature>`` as in the training set: user values, and per-candidate lists."""

    user: dict[str, Any]
    items: dict[str, list[Any]]
    cold_start: dict[str, int] = field(default_factory=dict)
    """rows served from defaults per view because the store had none (of an unknown entity, or no history yet)"""
    degraded: bool = False
    """the store was unreachable (or the user's row did not fit the config): the user's features (and the
    candidates' if the item cache never loaded) are defaults"""


class FeatureClient:
    """Reads the serving feature services of the configured environment; opens the store on first use."""

    def __init__(self, cfg: Config, store: FeatureStore | None = None) -> None:
        self._cfg = cfg
        self._store = store
        self._services: dict[str, FeatureService] = {}
        self._defaults = fs.defaults(cfg)
        self._items: ItemCache | None = None
        self._published: PublishedRegistry | None = None
        """the ``serving`` environment's checked copy of the published registry"""
        self._next_registry_check = time.monotonic() + cfg.features.item_cache_check_s

    def fetch(self, user_id: int, item_ids: Sequence[int], session: bool = True) -> OnlineFeatures:
        """The user's and every candidate's features, in ``item_ids`` order; ``session``: also the user's
        ``user_session`` row (a request that continues a session; else that view is left at its defaults)."""
        user_views = tuple(
            v for v in fs.SERVICES[fs.USER_SERVING_SERVICE] if session or v is not fs.USER_SESSION
        )
        item_views = fs.SERVICES[fs.ITEM_SERVING_SERVICE]
        ids = [int(i) for i in item_ids]
        self._follow_publication()
        user_read = self._guarded(lambda: self._read_user(int(user_id), user_views))
        mismatched = user_read is not None and not self._fits(user_read)
        if mismatched:
            log.warning("feature store: user %d's row does not fit this config, serving defaults", user_id)
            FALLBACKS.labels(reason=MISMATCHED).inc()
            user_read = None
        cached = self._guarded(lambda: self._item_cache().get(ids)) if ids else {}
        user, user_cold = self._filled(user_views, user_read or {}, 1)
        items, item_cold = self._filled(item_views, cached or {}, len(ids))
        unreachable = (user_read is None and not mismatched) + (len(ids) if cached is None else 0)
        cold = ({} if user_read is None else user_cold) | ({} if cached is None else item_cold)
        if unreachable:
            FALLBACKS.labels(reason=UNREACHABLE).inc(unreachable)
        unknown = cold.get(fs.USER_PROFILE.name, 0) + cold.get(fs.ITEM_PROFILE.name, 0)
        if unknown:
            FALLBACKS.labels(reason=COLD_START).inc(unknown)
        if not session:
            user |= {
                f"{fs.USER_SESSION.name}__{f.name}": [_copy(self._defaults[fs.USER_SESSION.name][f.name])]
                for f in fs.USER_SESSION.features
            }
        return OnlineFeatures(
            user={k: v[0] for k, v in user.items()},
            items=items,
            cold_start=cold,
            degraded=unreachable > 0 or mismatched,
        )

    def warm_up(self) -> None:
        """Import Feast, open the store and read one user row now, not in the first request; counts no fallback
        (no one was served)."""
        self._guarded(lambda: self._read_user(0, fs.SERVICES[fs.USER_SERVING_SERVICE]))

    def _fits(self, row: Mapping[str, list[Any]]) -> bool:
        """Whether the user's row has this config's shape: ``category_watch_share`` of ``world.n_categories``
        values (a store built for another config; the model's input could not be built from it)."""
        share = row.get(f"{fs.USER_BEHAVIOUR.name}__category_watch_share", [None])[0]
        return not isinstance(share, list | tuple) or len(share) == self._cfg.world.n_categories

    @staticmethod
    def _guarded(read: Callable[[], T]) -> T | None:
        """``read()``, or None (logged) when the store cannot be opened or read."""
        try:
            return read()
        except Exception as err:  # noqa: BLE001 - any store failure degrades to defaults, never to the caller
            log.warning("feature store unreachable, serving defaults: %s: %s", type(err).__name__, err)
            return None

    def refresh_items(self) -> None:
        """Check the registry for a new materialisation of the item views now and reload the cache if it moved."""
        self._follow_publication(at_once=True)
        self._item_cache().refresh(wait=True)

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
            "session_id": int(session_id),
            "session_step": int(step),
            "session_items_watched": int(items_watched),
            "session_watch_time_s": float(watch_time_s),
            "last_watch_fraction": float(last_watch_fraction),
        }
        return self.push(fs.USER_SESSION, user_id, at, row)

    def push(self, view: fs.ViewSpec, user_id: int, at: datetime, row: Mapping[str, Any]) -> bool:
        """Write one user's fresh row of a pushed ``view`` to the online store, stamped ``at``; False (logged) if
        the store is down.

        The row goes straight to the view, the one its push source feeds: what ``FeatureStore.push`` to that
        source does online, without the push's rebuilding of every feature view and service from the registry
        on each call (7 of a feedback's 9 ms, docs/benchmarks.md). No feature service precomputes online
        vectors, the one step of the push this leaves out."""
        if not view.pushed or view.entity != fs.USER:
            raise ValueError(f"feature view {view.name!r} is not a user view fed by a push source")
        names = [f.name for f in view.features]
        if sorted(row) != sorted(names):
            raise ValueError(
                f"a {view.name} row has the features {sorted(row)}, not the view's {sorted(names)}"
            )
        frame = {fs.USER.join_key: [int(user_id)], fs.TIMESTAMP: [at], **{k: [v] for k, v in row.items()}}
        try:
            import pandas as pd

            self._open().write_to_online_store(view.name, pd.DataFrame(frame))
        except Exception as err:  # noqa: BLE001 - a lost push only leaves the row stale
            log.warning("feature store push to %s failed: %s: %s", view.name, type(err).__name__, err)
            return False
        return True

    @property
    def store(self) -> FeatureStore:
        """The Feast store this client reads and pushes to, opened on first use."""
        return self._open()

    def _open(self) -> FeatureStore:
        if self._store is None:
            self._store = self._open_store()
        return self._store

    def _open_store(self) -> FeatureStore:
        """The configured environment's store; a serving replica's reads a checked private copy of the published
        registry (unexrl/features/published.py), never the published file."""
        if self._cfg.features.environment != SERVING:
            return open_store(self._cfg)
        if self._published is None:
            published = os.environ.get(ENV_FEAST_REGISTRY)
            if not published:
                raise ValueError(
                    f"features.environment={SERVING} needs {ENV_FEAST_REGISTRY}: the published registry"
                )
            project = yaml.safe_load(store_yaml(self._cfg).read_text())["project"]
            self._published = PublishedRegistry(Path(published), project)
        self._published.sync()
        return open_store(self._cfg, registry=self._published.copy)

    def _item_cache(self) -> ItemCache:
        if self._items is None:
            self._items = ItemCache(
                self._open(), self._cfg.world.n_items, self._cfg.features.item_cache_check_s
            )
        return self._items

    def _follow_publication(self, at_once: bool = False) -> None:
        """A serving replica's look for a new publication (at most every ``features.item_cache_check_s``, or
        ``at_once``): copied once checked, and Feast's registry cache refreshed to read it (the item cache then
        sees a new materialisation at its next check; a new registry may redefine the feature services). A
        refused or missing publication is logged, and the last good copy stays in use."""
        now = time.monotonic()
        if (
            self._published is None
            or self._store is None
            or (now < self._next_registry_check and not at_once)
        ):
            return
        self._next_registry_check = now + self._cfg.features.item_cache_check_s
        try:
            if self._published.sync():
                self._services.clear()
                self._store.refresh_registry()
        except Exception as err:  # noqa: BLE001 - a publication that cannot be used keeps the last good copy
            log.warning("feature registry: keeping the last good copy: %s: %s", type(err).__name__, err)

    def _read_user(self, user_id: int, views: tuple[fs.ViewSpec, ...]) -> dict[str, list[Any]]:
        """One online read of the user's rows of ``views`` (the serving service, or all of it but the session)."""
        store = self._open()
        service = self._services.get(fs.USER_SERVING_SERVICE)  # cleared when a new publication is copied
        if service is None:
            service = self._services[fs.USER_SERVING_SERVICE] = store.get_feature_service(
                fs.USER_SERVING_SERVICE
            )
        full = fs.SERVICES[fs.USER_SERVING_SERVICE]
        features: Any = (
            service if views == full else [f"{v.name}:{f.name}" for v in views for f in v.features]
        )
        response = store.get_online_features(
            features=features, entity_rows=[{fs.USER.join_key: user_id}], full_feature_names=True
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
