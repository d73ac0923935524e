"""Feature tables from a log directory, with event timestamps that make every point-in-time join honest.

When is a value known? A request's outcome (what was watched, clicked, liked) is complete once the page has
been watched: at ``event_timestamp + reward`` seconds (the page's watch time), plus one microsecond so that it
is always strictly after the request itself. That instant is the request's *feedback time*. Every aggregate
over outcomes (user behaviour, item statistics, CQR knots) is stamped with the feedback time of the newest
outcome it includes and includes every outcome with feedback time <= its stamp. A point-in-time join at a
request's timestamp t (Feast keeps rows stamped <= t) therefore only ever sees requests whose feedback was
complete by t, which are all strictly before t, never the request itself and never a later one. Attributes
that do not depend on outcomes (user activity group, item category and duration) are stamped at the log's
first request; session state is stamped at the request it describes (it summarises earlier pages only).
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from unexrl.config import Config
from unexrl.contracts import files
from unexrl.contracts.logs import FeatureManifest, FeatureTable
from unexrl.data import LoggedData, read_logs
from unexrl.data.reader import list_matrix
from unexrl.features import schema as fs
from unexrl.features.storage import filesystem, join, local_directory, normalize, publish_directory
from unexrl.io import sha256_file
from unexrl.rl.cqr import duration_bucket, fit_cqr_knots

US = 1_000_000


def build_features(
    logs: str | Path, out: str | Path, cfg: Config, overwrite: bool = False
) -> FeatureManifest:
    """Read and validate ``logs``, compute every feature table, write them and a manifest to ``out``.

    The log is validated against the config recorded in it; ``cfg`` contributes only its ``features``
    section. Returns the manifest.
    """
    with local_directory(logs) as local:
        data = read_logs(local)
    cfg = data.config.model_copy(update={"features": cfg.features})
    tables = compute_feature_tables(data, cfg)
    entries: dict[str, FeatureTable] = {}
    with publish_directory(out, overwrite=overwrite) as tmp:
        for name, table in tables.items():
            view = fs.VIEWS_BY_NAME[name]
            pq.write_table(table, tmp / view.file, compression="zstd")
            stamps = table[fs.TIMESTAMP]
            entries[name] = FeatureTable(
                file=view.file,
                rows=table.num_rows,
                sha256=sha256_file(tmp / view.file),
                min_timestamp=pc.min(stamps).as_py() if table.num_rows else None,
                max_timestamp=pc.max(stamps).as_py() if table.num_rows else None,
            )
        manifest = FeatureManifest(
            created_at=datetime.now(UTC),
            logs=normalize(logs),
            logs_manifest_sha256=data.manifest_sha256,
            config=cfg.to_dict(),
            tables=entries,
        )
        manifest.write(tmp / files.MANIFEST)
    return manifest


def read_manifest(features: str | Path) -> FeatureManifest:
    """The manifest ``build_features`` wrote at ``features`` (a path or URI)."""
    where = join(features, files.MANIFEST)
    fsys, path = filesystem(where)
    with fsys.open_input_stream(path) as f:
        return FeatureManifest.parse(f.read(), where)


def verify_feature_tables(features: str | Path, logs_manifest_sha256: str | None = None) -> FeatureManifest:
    """The manifest at ``features``, once every table it lists hashes to its recorded sha256 (and, given
    ``logs_manifest_sha256``, once it was built from those logs): Feast reads the Parquet files directly, so this
    is where a table replaced or cut short after the build is caught. ValueError names the table."""
    manifest = read_manifest(features)
    if logs_manifest_sha256 is not None and manifest.logs_manifest_sha256 != logs_manifest_sha256:
        raise ValueError(
            f"{normalize(features)}: feature tables built from the logs {manifest.logs} (manifest sha256 "
            f"{manifest.logs_manifest_sha256[:12]}...), not from these ({logs_manifest_sha256[:12]}...)"
        )
    for name, table in manifest.tables.items():
        fsys, path = filesystem(join(features, table.file))
        digest = hashlib.sha256()
        with fsys.open_input_stream(path) as f:
            while block := f.read(1 << 20):
                digest.update(block)
        if digest.hexdigest() != table.sha256:
            raise ValueError(
                f"{join(features, table.file)}: sha256 {digest.hexdigest()[:12]}... is not the manifest's "
                f"{table.sha256[:12]}... for {name}; refusing feature tables changed after they were built"
            )
    return manifest


def compute_feature_tables(data: LoggedData, cfg: Config) -> dict[str, pa.Table]:
    """Every view's table, sorted by entity and time, one row per (entity, event_timestamp)."""
    log = _Log(data, cfg)
    builders = {
        fs.USER_PROFILE.name: log.user_profile,
        fs.USER_BEHAVIOUR.name: log.user_behaviour,
        fs.USER_SESSION.name: log.user_session,
        fs.ITEM_PROFILE.name: log.item_profile,
        fs.ITEM_STATS.name: log.item_stats,
        fs.CQR_KNOTS.name: log.cqr_knots,
    }
    tables = {}
    for name, builder in tqdm(builders.items(), desc="features", leave=False):
        columns = builder()
        tables[name] = pa.table(columns, schema=fs.VIEWS_BY_NAME[name].arrow_schema())
    return tables


def feedback_us(event_us: np.ndarray, reward_s: np.ndarray) -> np.ndarray:
    """Feedback time in microseconds: the request plus its page's watch time plus 1 us (strictly after it)."""
    return event_us + np.floor(reward_s.astype(np.float64) * US).astype(np.int64) + 1


class _Log:
    """The log as numpy arrays, rows of page-level columns shaped [requests, page size]."""

    def __init__(self, data: LoggedData, cfg: Config) -> None:
        tr = data.transitions
        if tr.num_rows == 0:
            raise ValueError("the log has no transitions: nothing to compute features from")
        self.cfg = cfg
        self.users, self.items = data.users, data.items
        self.user = _column(tr, "user_id")
        self.session = _column(tr, "session_id")
        self.event_us = _column(tr, "event_timestamp", pa.int64())
        self.feedback_us = feedback_us(self.event_us, _column(tr, "reward"))
        self.start_us = int(self.event_us.min())
        k = cfg.cascade.page_size
        self.shown = list_matrix(tr, "shown_item_ids", k)
        self.viewed = list_matrix(tr, "viewed", k)
        self.watch = list_matrix(tr, "watch_time_s", k).astype(np.float64) * self.viewed
        self.click = list_matrix(tr, "click", k) & self.viewed
        self.like = list_matrix(tr, "like", k) & self.viewed
        item_pos = _lookup(_column(self.items, "item_id"), self.shown)
        self.category = _column(self.items, "category").astype(np.int64)[item_pos]
        self.duration = _column(self.items, "duration_s").astype(np.float64)[item_pos]
        self.fraction = self.watch / self.duration
        self.defaults = fs.defaults(cfg)
        self.transitions = tr

    def user_profile(self) -> dict[str, Any]:
        n = self.users.num_rows
        return {
            "user_id": self.users["user_id"],
            fs.TIMESTAMP: _timestamps(np.full(n, self.start_us)),
            "activity_group": _column(self.users, "activity_group").astype(np.int64),
        }

    def item_profile(self) -> dict[str, Any]:
        duration = _column(self.items, "duration_s")
        return {
            "item_id": self.items["item_id"],
            fs.TIMESTAMP: _timestamps(np.full(self.items.num_rows, self.start_us)),
            "category": _column(self.items, "category").astype(np.int64),
            "duration_s": duration,
            "duration_bucket": _item_group(duration, self.cfg),
        }

    def user_session(self) -> dict[str, Any]:
        tr = self.transitions
        order, keep = _latest_per_stamp(self.user, self.event_us)
        pick = order[keep]
        return {
            "user_id": self.user[pick],
            fs.TIMESTAMP: _timestamps(self.event_us[pick]),
            "session_id": self.session[pick],
            "session_step": _column(tr, "step").astype(np.int64)[pick],
            "session_items_watched": _column(tr, "session_items_watched").astype(np.int64)[pick],
            "session_watch_time_s": _column(tr, "session_watch_time_s")[pick],
            "last_watch_fraction": _column(tr, "last_watch_fraction")[pick],
        }

    def user_behaviour(self) -> dict[str, Any]:
        """Running totals per user over requests in feedback-time order, one row per feedback time."""
        order, keep = _latest_per_stamp(self.user, self.feedback_us)
        start = _group_start(self.user[order])
        viewed = self.viewed[order]
        n_viewed = viewed.sum(1)
        first_of_session = np.zeros(len(order), dtype=np.int64)
        first_of_session[np.unique(self.session[order], return_index=True)[1]] = 1
        watch, fraction = self.watch[order], self.fraction[order]
        views = _grouped_cumsum(n_viewed, start)
        total_watch = _grouped_cumsum(watch.sum(1), start)
        n_cat = self.cfg.world.n_categories
        cat_watch = np.zeros((len(order), n_cat))
        np.add.at(cat_watch, (np.arange(len(order))[:, None], self.category[order]), watch)
        cat_watch = _grouped_cumsum(cat_watch, start)

        # The viewed items of all requests in this order, flattened; each row's recent window ends at its own.
        flat_items, flat_fraction = self.shown[order][viewed], fraction[viewed]
        ends = np.cumsum(n_viewed)
        first = np.maximum((ends - n_viewed)[start], ends - self.cfg.features.recent_items)
        recent_sum = np.concatenate([[0.0], np.cumsum(flat_fraction)])
        lengths = ends - first
        recent_fraction = (recent_sum[ends] - recent_sum[first]) / np.maximum(lengths, 1)
        idx = _ranges(first, lengths)
        offsets = np.concatenate([[0], np.cumsum(lengths)])

        default = self.defaults[fs.USER_BEHAVIOUR.name]
        seen = views > 0

        def mean(total: np.ndarray, name: str) -> np.ndarray:
            return np.where(seen, total / np.maximum(views, 1), default[name]).astype(np.float32)

        share = np.where(
            total_watch[:, None] > 0, cat_watch / np.maximum(total_watch, 1e-12)[:, None], 1.0 / n_cat
        )
        item_pos = _lookup(_column(self.items, "item_id"), flat_items)
        flat_categories = _column(self.items, "category").astype(np.int64)[item_pos]
        columns = {
            "user_id": self.user[order],
            fs.TIMESTAMP: _timestamps(self.feedback_us[order]),
            "requests": _grouped_cumsum(np.ones(len(order), dtype=np.int64), start),
            "sessions": _grouped_cumsum(first_of_session, start),
            "items_viewed": views,
            "watch_time_s": total_watch.astype(np.float32),
            "mean_watch_time_s": mean(total_watch, "mean_watch_time_s"),
            "mean_watch_fraction": mean(_grouped_cumsum(fraction.sum(1), start), "mean_watch_fraction"),
            "mean_viewed_duration_s": mean(
                _grouped_cumsum((self.duration[order] * viewed).sum(1), start), "mean_viewed_duration_s"
            ),
            "click_rate": mean(_grouped_cumsum(self.click[order].sum(1), start), "click_rate"),
            "like_rate": mean(_grouped_cumsum(self.like[order].sum(1), start), "like_rate"),
            "recent_watch_fraction": np.where(
                lengths > 0, recent_fraction, default["recent_watch_fraction"]
            ).astype(np.float32),
            "category_watch_share": _lists(
                np.arange(0, share.size + 1, n_cat), share.astype(np.float32).ravel()
            ),
            "recent_item_ids": _lists(offsets, flat_items[idx]),
            "recent_category_ids": _lists(offsets, flat_categories[idx]),
            "recent_watch_fractions": _lists(offsets, flat_fraction[idx].astype(np.float32)),
        }
        return {name: _take(values, keep) for name, values in columns.items()}

    def item_stats(self) -> dict[str, Any]:
        """Running totals per item over impressions in feedback-time order, one row per feedback time."""
        item, stamp = self.shown.ravel(), np.repeat(self.feedback_us, self.shown.shape[1])
        order, keep = _latest_per_stamp(item, stamp)
        start = _group_start(item[order])
        impressions = _grouped_cumsum(np.ones(len(order), dtype=np.int64), start)
        views = _grouped_cumsum(self.viewed.ravel()[order].astype(np.int64), start)
        fraction = _grouped_cumsum(self.fraction.ravel()[order], start)
        likes = _grouped_cumsum(self.like.ravel()[order].astype(np.int64), start)
        prior = self.cfg.features.quality_prior_views
        quality = np.where(
            views + prior > 0, (fraction + 0.5 * prior) / np.maximum(views + prior, 1e-12), 0.5
        )
        columns = {
            "item_id": item[order],
            fs.TIMESTAMP: _timestamps(stamp[order]),
            "impressions": impressions,
            "views": views,
            "view_rate": (views / impressions).astype(np.float32),
            "quality_estimate": quality.astype(np.float32),
            "popularity_estimate": np.log1p(views).astype(np.float32),
            "like_rate": (likes / np.maximum(views, 1)).astype(np.float32),
        }
        return {name: _take(values, keep) for name, values in columns.items()}

    def cqr_knots(self) -> dict[str, Any]:
        """Knots refitted every ``cqr_refit_s`` and once at the last feedback, each on feedback stamped <= it."""
        user_pos = _lookup(_column(self.users, "user_id"), self.user)
        user_group = _column(self.users, "activity_group").astype(np.int64)[user_pos]
        if self.cfg.features.cqr_unit == "page":  # one unit per request: its page watch time, one item group
            watch = torch.from_numpy(self.watch.sum(1))
            groups_u = torch.from_numpy(user_group)
            groups_i_t = torch.zeros_like(groups_u)
            stamps = self.feedback_us
        else:  # one unit per viewed item, grouped by duration bucket
            viewed = self.viewed
            watch = torch.from_numpy(self.watch[viewed])
            groups_u = torch.from_numpy(np.broadcast_to(user_group[:, None], viewed.shape)[viewed])
            groups_i_t = torch.from_numpy(_item_group(self.duration[viewed], self.cfg))
            stamps = np.broadcast_to(self.feedback_us[:, None], viewed.shape)[viewed]
        n_u, n_i = len(self.cfg.world.user_types), fs.n_item_groups(self.cfg)
        step = int(self.cfg.features.cqr_refit_s * US)
        last = int(self.feedback_us.max())
        fits = [t for t in range(self.start_us + step, last, step) if (stamps <= t).any()] + [last]
        cell_u, cell_i = np.divmod(np.arange(n_u * n_i), n_i)
        columns: dict[str, list[Any]] = {name: [] for name in fs.CQR_KNOTS.arrow_schema().names}
        for t in tqdm(fits, desc="cqr knots", leave=False):
            use = torch.from_numpy(stamps <= t)
            knots = fit_cqr_knots(
                watch[use], groups_u[use], groups_i_t[use], n_u, n_i, self.cfg.features.cqr_knots
            )
            counts = np.bincount((groups_u[use] * n_i + groups_i_t[use]).numpy(), minlength=n_u * n_i)
            columns["cqr_cell_id"].extend(range(n_u * n_i))
            columns[fs.TIMESTAMP].extend([t] * (n_u * n_i))
            columns["user_group"].extend(cell_u.tolist())
            columns["item_group"].extend(cell_i.tolist())
            columns["knots"].extend(knots.reshape(n_u * n_i, -1).tolist())
            columns["samples"].extend(counts.tolist())
        order = np.lexsort((np.asarray(columns[fs.TIMESTAMP]), np.asarray(columns["cqr_cell_id"])))
        types = fs.CQR_KNOTS.arrow_schema()
        out = {
            name: pa.array(values, type=types.field(name).type).take(order)
            for name, values in columns.items()
            if name != fs.TIMESTAMP
        }
        return {**out, fs.TIMESTAMP: _timestamps(np.asarray(columns[fs.TIMESTAMP], dtype=np.int64)[order])}


def _column(table: pa.Table, name: str, cast: pa.DataType | None = None) -> np.ndarray:
    column = table[name]
    return np.asarray(column.cast(cast) if cast is not None else column)


def _lookup(column_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Row positions of ``ids`` in an id column (read_logs checked that every id is present)."""
    order = np.argsort(column_ids, kind="stable")
    return order[np.searchsorted(column_ids, ids, sorter=order)]


def _item_group(duration_s: np.ndarray, cfg: Config) -> np.ndarray:
    edges = cfg.features.duration_bucket_edges_s
    return (
        duration_bucket(torch.from_numpy(np.asarray(duration_s, dtype=np.float64)), edges)
        .numpy()
        .astype(np.int64)
    )


def _timestamps(us: np.ndarray) -> pa.Array:
    return pa.array(np.asarray(us, dtype=np.int64), type=pa.int64()).cast(fs.TIMESTAMP_TYPE)


def _latest_per_stamp(entity: np.ndarray, stamp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Order by (entity, stamp) and a mask of the last row of each (entity, stamp): one row per pair."""
    order = np.lexsort((stamp, entity))
    e, s = entity[order], stamp[order]
    keep = np.ones(len(order), dtype=bool)
    keep[:-1] = (e[1:] != e[:-1]) | (s[1:] != s[:-1])
    return order, keep


def _group_start(sorted_keys: np.ndarray) -> np.ndarray:
    """For each row of a sorted key column, the index of the first row of its group."""
    first = np.ones(len(sorted_keys), dtype=bool)
    first[1:] = sorted_keys[1:] != sorted_keys[:-1]
    return np.maximum.accumulate(np.where(first, np.arange(len(sorted_keys)), 0))


def _grouped_cumsum(values: np.ndarray, start: np.ndarray) -> np.ndarray:
    """Running sums that restart at every group (rows sorted by group; ``start`` from :func:`_group_start`)."""
    total = np.cumsum(values, axis=0)
    return total - total[start] + values[start]


def _ranges(first: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(first[i], first[i] + lengths[i]) over i."""
    offsets = np.cumsum(lengths) - lengths
    return np.arange(int(lengths.sum())) - np.repeat(offsets, lengths) + np.repeat(first, lengths)


def _lists(offsets: np.ndarray, values: np.ndarray) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(offsets, type=pa.int32()), pa.array(values))


def _take(values: Any, keep: np.ndarray) -> Any:
    return values.filter(pa.array(keep)) if isinstance(values, pa.Array) else values[keep]
