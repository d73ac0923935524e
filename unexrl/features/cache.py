"""Candidate item features for serving, from a process-local copy of the online store's item views.

Reading 500 candidates through Feast costs 50-100 ms (per-entity work in Python, docs/benchmarks.md), while item
features change only when a new materialisation is published. So the serving client keeps every catalogue item's
``item_profile`` and ``item_stats`` row in memory, loaded from the online store in bulk, and serves candidates
from it in microseconds.

Refresh rule: at most every ``features.item_cache_check_s`` seconds a request checks the registry (a refresh of
Feast's registry cache: one read of the registry file); when either item view's materialised end time differs
from the loaded copy's, a background thread reloads the whole copy and swaps it in at once. Until then, and if a
reload fails (logged, retried at the next check), the previous copy is served: stale by at most one
materialisation, never a mix of two.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from unexrl.features import schema as fs

if TYPE_CHECKING:
    from feast import FeatureStore

log = logging.getLogger(__name__)

VIEWS = fs.SERVICES[fs.ITEM_SERVING_SERVICE]
LOAD_CHUNK = 2000
"""items per online read while loading"""

Version = tuple[datetime | None, ...]
"""the item views' materialised end times, in VIEWS order"""


@dataclass(frozen=True)
class ItemCopy:
    """One materialisation's item rows: per ``<view>__<feature>`` column a list indexed by item id (None: no row)."""

    version: Version
    columns: dict[str, list[Any]]
    n_items: int


class ItemCache:
    """Every catalogue item's serving features, reloaded when the registry shows a new materialisation."""

    def __init__(self, store: FeatureStore, n_items: int, check_every_s: float) -> None:
        self._store, self._n_items, self._check_every_s = store, n_items, check_every_s
        self._copy: ItemCopy | None = None
        self._checked = -float("inf")
        self._reloading: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def version(self) -> Version | None:
        """The loaded copy's version (None before the first load)."""
        return self._copy.version if self._copy is not None else None

    def get(self, item_ids: list[int]) -> dict[str, list[Any]] | None:
        """The items' rows, columns named ``<view>__<feature>`` (None where the store has no row); None when no
        copy has been loaded yet (the store was unreachable so far)."""
        self._maybe_refresh()
        copy = self._copy
        if copy is None:
            return None
        return {
            name: [values[i] if 0 <= i < copy.n_items else None for i in item_ids]
            for name, values in copy.columns.items()
        }

    def refresh(self, wait: bool = True) -> None:
        """Check the registry now and reload if it moved (``wait``: until the reload is done)."""
        self._checked = -float("inf")
        self._maybe_refresh()
        thread = self._reloading
        if wait and thread is not None:
            thread.join()

    def _maybe_refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked < self._check_every_s:
            return
        with self._lock:
            if now - self._checked < self._check_every_s or (self._reloading and self._reloading.is_alive()):
                return
            self._checked = now
            try:
                self._store.refresh_registry()
                version = self._registry_version()
            except Exception as err:  # noqa: BLE001 - a registry hiccup keeps the current copy
                log.warning("item cache: registry check failed: %s: %s", type(err).__name__, err)
                return
            if self._copy is not None and version == self._copy.version:
                return
            self._reloading = threading.Thread(target=self._reload, args=(version,), daemon=True)
            self._reloading.start()
            if self._copy is None:  # the first load: the caller waits rather than serving defaults
                self._reloading.join()

    def _registry_version(self) -> Version:
        return tuple(self._store.get_feature_view(view.name).most_recent_end_time for view in VIEWS)

    def _reload(self, version: Version) -> None:
        started = time.perf_counter()
        try:
            service = self._store.get_feature_service(fs.ITEM_SERVING_SERVICE)
            columns: dict[str, list[Any]] = {}
            for start in range(0, self._n_items, LOAD_CHUNK):
                ids = range(start, min(start + LOAD_CHUNK, self._n_items))
                read = self._store.get_online_features(
                    features=service,
                    entity_rows=[{fs.ITEM.join_key: i} for i in ids],
                    full_feature_names=True,
                ).to_dict()
                for view in VIEWS:
                    for feature in view.features:
                        name = f"{view.name}__{feature.name}"
                        columns.setdefault(name, []).extend(read[name])
        except Exception as err:  # noqa: BLE001 - keep serving the previous copy; the next check retries
            log.warning(
                "item cache: reload failed, keeping the previous copy: %s: %s", type(err).__name__, err
            )
            return
        self._copy = ItemCopy(version, columns, self._n_items)
        log.info(
            "item cache: loaded %d items (materialised to %s) in %.1f s",
            self._n_items,
            max((v for v in version if v is not None), default=None),
            time.perf_counter() - started,
        )
