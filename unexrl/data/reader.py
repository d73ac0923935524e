"""Read and validate a logged-data directory, and turn transitions back into cascade inputs for replay.

Logs may come from outside the simulator, so every rule of the contract is checked on read and a violation
raises :class:`LogValidationError` naming the file, the column and the first bad rows. Nothing is dropped or
repaired: a consumer either gets the whole log as written or an error it can act on.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from pydantic import ValidationError
from torch import Tensor

from unexrl.config import Config
from unexrl.contracts.base import ContractError
from unexrl.contracts.logs import LogManifest
from unexrl.data.schema import (
    ITEMS_FILE,
    MANIFEST_FILE,
    TRANSITIONS_FILE,
    USERS_FILE,
    action_column,
    candidates_column,
    items_schema,
    pred_column,
    request_id,
    transitions_schema,
    users_schema,
)
from unexrl.io import read_parquet_hashed
from unexrl.sim.world import World, build_world

_SHOWN_ROWS = 5


class LogValidationError(ValueError):
    """A log that breaks the contract; ``file``, ``column`` and ``rows`` say where, the message says what."""

    def __init__(self, file: str, column: str | None, problem: str, rows: np.ndarray | None = None) -> None:
        self.file, self.column = file, column
        self.rows = [] if rows is None else [int(r) for r in rows]
        where = file if column is None else f"{file}, column '{column}'"
        message = f"{where}: {problem}"
        if self.rows:
            first = ", ".join(str(r) for r in self.rows[:_SHOWN_ROWS])
            more = f", ...] ({len(self.rows)} rows)" if len(self.rows) > _SHOWN_ROWS else "]"
            message += f" at rows [{first}{more}"
        super().__init__(message)


@dataclass(frozen=True)
class LoggedData:
    """A validated log: the three tables as written, the manifest, and the config used to check them."""

    users: pa.Table
    items: pa.Table
    transitions: pa.Table
    manifest: LogManifest
    manifest_sha256: str
    """of the manifest's bytes as they were read and validated: what a derived artifact names its logs by"""
    config: Config


def read_logs(path: Path, cfg: Config | None = None) -> LoggedData:
    """Read a log directory and validate it against ``cfg`` (default: the config recorded in its manifest).

    Content is checked before the manifest hashes, so a defective file reports its first bad rows rather than
    only "file changed".
    """
    path = Path(path)
    manifest, manifest_sha256 = _read_manifest(path)
    if cfg is None:
        try:
            cfg = Config.model_validate_json(json.dumps(manifest.config))
        except ValidationError as err:
            raise LogValidationError(MANIFEST_FILE, None, f"'config' is not a valid config: {err}") from None
    users, users_sha = _read_table(path, USERS_FILE, users_schema())
    items, items_sha = _read_table(path, ITEMS_FILE, items_schema())
    transitions, transitions_sha = _read_table(path, TRANSITIONS_FILE, transitions_schema(cfg))
    world = build_world(cfg)
    _check_users(users, cfg, world)
    _check_items(items, cfg, world)
    _check_transitions(transitions, users, items, cfg)
    for name, table, digest in (
        (USERS_FILE, users, users_sha),
        (ITEMS_FILE, items, items_sha),
        (TRANSITIONS_FILE, transitions, transitions_sha),
    ):
        entry = manifest.files[name]
        if table.num_rows != entry.rows:
            raise LogValidationError(name, None, f"{table.num_rows} rows but the manifest says {entry.rows}")
        if digest != entry.sha256:
            raise LogValidationError(
                name,
                None,
                f"sha256 {digest} does not match the manifest's {entry.sha256}: "
                "the file changed after the manifest was written",
            )
    return LoggedData(
        users=users,
        items=items,
        transitions=transitions,
        manifest=manifest,
        manifest_sha256=manifest_sha256,
        config=cfg,
    )


def cascade_inputs(transitions: pa.Table, cfg: Config) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Per stage: predictions [B, P, d_i] float32, actions [B, d_i] float32, logged candidates [B, K_i] int64.

    ``run_cascade(preds, keep, replay_actions(actions))`` then recomputes the candidate sets to compare with
    the logged ones. Expects a table that passed :func:`read_logs`.
    """
    pool, n = cfg.cascade.pool_size, transitions.num_rows
    preds, actions, candidates = [], [], []
    for stage in cfg.cascade.stages:
        d = len(stage.heads)
        pred = (
            list_matrix(transitions, pred_column(stage.name), pool * d).astype(np.float32).reshape(n, pool, d)
        )
        preds.append(torch.from_numpy(pred))
        actions.append(
            torch.from_numpy(list_matrix(transitions, action_column(stage.name), d).astype(np.float32))
        )
        kept = list_matrix(transitions, candidates_column(stage.name), stage.keep).astype(np.int64)
        candidates.append(torch.from_numpy(kept))
    return preds, actions, candidates


def list_matrix(table: pa.Table, column: str, width: int) -> np.ndarray:
    """A list column with ``width`` values per row as [rows, width] (list or fixed_size_list alike)."""
    flat = pc.list_flatten(table[column]).to_numpy(zero_copy_only=False)
    if flat.size != table.num_rows * width:
        raise ValueError(f"column '{column}': {flat.size} values for {table.num_rows} rows of {width}")
    return flat.reshape(table.num_rows, width)


def _read_manifest(path: Path) -> tuple[LogManifest, str]:
    """The manifest and the sha256 of the bytes it was parsed from (read once)."""
    file = path / MANIFEST_FILE
    try:
        data = file.read_bytes()
        return LogManifest.parse(data, str(file)), hashlib.sha256(data).hexdigest()
    except FileNotFoundError:
        raise LogValidationError(MANIFEST_FILE, None, f"missing in {path}") from None
    except ContractError as err:
        raise LogValidationError(MANIFEST_FILE, None, str(err)) from None


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _describe(t: pa.DataType) -> str:
    if pa.types.is_fixed_size_list(t):
        return f"fixed_size_list<{t.value_type}>[{t.list_size}] (or list<{t.value_type}>)"
    if _is_list(t):
        return f"list<{t.value_type}>"
    return str(t)


def _read_table(path: Path, name: str, schema: pa.Schema) -> tuple[pa.Table, str]:
    """Read one table and check every column of ``schema``: presence, dtype, nulls, list lengths, finiteness.

    Returns the table and the sha256 of the very bytes it was parsed from (read once, so a file replaced while
    it is read cannot pass the manifest's hash with other content). List columns may be list or
    fixed_size_list on disk (files can come from other writers); their lengths are checked against the config
    either way. Extra columns are kept, not rejected.
    """
    file = path / name
    if not file.is_file():
        raise LogValidationError(name, None, f"missing in {path}")
    try:
        table, digest = read_parquet_hashed(file)
    except (pa.ArrowException, OSError) as err:
        raise LogValidationError(name, None, f"not a readable Parquet file: {err}") from None
    for field in schema:
        if field.name not in table.column_names:
            raise LogValidationError(name, field.name, "missing column")
        if table.column_names.count(field.name) > 1:
            raise LogValidationError(name, field.name, "column appears more than once")
        col = table[field.name]
        expected = field.type
        nested = _is_list(expected)
        ok = (
            col.type == expected
            if not nested
            else _is_list(col.type) and col.type.value_type == expected.value_type
        )
        if not ok:
            raise LogValidationError(
                name, field.name, f"wrong dtype: expected {_describe(expected)}, found {col.type}"
            )
        if not field.nullable and col.null_count:
            raise LogValidationError(name, field.name, "null values", _nonzero(col.is_null()))
        if nested:
            _check_list(name, field, col)
        elif pa.types.is_floating(expected):
            values = col.to_numpy()
            _require(name, field.name, np.isfinite(values), "NaN or infinite values")
    return table, digest


def _check_list(name: str, field: pa.Field, col: pa.ChunkedArray) -> None:
    flat = pc.list_flatten(col)
    parents = pc.list_parent_indices(col).to_numpy()
    if flat.null_count:
        raise LogValidationError(
            name, field.name, "null list elements", np.unique(parents[_nonzero(flat.is_null())])
        )
    if pa.types.is_fixed_size_list(field.type):
        size = field.type.list_size
        lengths = pc.list_value_length(col).to_numpy()
        _require(name, field.name, lengths == size, f"ragged lists: expected {size} values per row")
    if pa.types.is_floating(field.type.value_type):
        bad = ~np.isfinite(flat.to_numpy())
        if bad.any():
            raise LogValidationError(name, field.name, "NaN or infinite values", np.unique(parents[bad]))


def _nonzero(mask: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.flatnonzero(mask.to_numpy(zero_copy_only=False))


def _require(file: str, column: str, ok: np.ndarray, problem: str) -> None:
    """Raise naming the rows where ``ok`` (one flag per row) is False."""
    if not ok.all():
        raise LogValidationError(file, column, problem, np.flatnonzero(~ok))


def _require_unique(file: str, column: str, values: np.ndarray) -> None:
    """Raise naming the rows that repeat an earlier value."""
    _, first = np.unique(values, return_index=True)
    if first.size != values.size:
        repeats = np.setdiff1d(np.arange(values.size), first)
        raise LogValidationError(file, column, "duplicate values", repeats)


def _require_ids(file: str, table: pa.Table, column: str, known: np.ndarray, what: str) -> None:
    """Every id in ``column`` (scalar or list) must be one of ``known``."""
    col = table[column]
    if _is_list(col.type):
        values, parents = pc.list_flatten(col).to_numpy(), pc.list_parent_indices(col).to_numpy()
        bad_rows = np.unique(parents[~np.isin(values, known)])
    else:
        bad_rows = np.flatnonzero(~np.isin(col.to_numpy(), known))
    if bad_rows.size:
        raise LogValidationError(file, column, f"ids not in the {what} table", bad_rows)


def _require_positions(file: str, column: str, ids: np.ndarray, n_world: int, what: str) -> None:
    """Ids are row positions 0..n-1 of a table as large as the config's world: the trainer indexes by them."""
    if ids.size != n_world:
        raise LogValidationError(file, column, f"{ids.size} {what} but the config's world has {n_world}")
    _require(file, column, ids == np.arange(ids.size), "ids must be the row positions 0..n-1")


def _require_world(file: str, column: str, values: np.ndarray, world: Tensor) -> None:
    """A column the config's world fixes (seeds.world): a log from another world would train on wrong values."""
    _require(
        file, column, values == world.cpu().numpy(), f"not the {column} of the config's world (seeds.world)"
    )


def _check_users(users: pa.Table, cfg: Config, world: World) -> None:
    _require_unique(USERS_FILE, "user_id", users["user_id"].to_numpy())
    _require_positions(USERS_FILE, "user_id", users["user_id"].to_numpy(), world.n_users, "users")
    group = users["activity_group"].to_numpy()
    n_groups = len(cfg.world.user_types)
    _require(USERS_FILE, "activity_group", (group >= 0) & (group < n_groups), f"outside [0, {n_groups})")
    _require_world(USERS_FILE, "activity_group", group, world.user_activity_group)


def _check_items(items: pa.Table, cfg: Config, world: World) -> None:
    _require_unique(ITEMS_FILE, "item_id", items["item_id"].to_numpy())
    _require_positions(ITEMS_FILE, "item_id", items["item_id"].to_numpy(), world.n_items, "items")
    category = items["category"].to_numpy()
    n_cat = cfg.world.n_categories
    _require(ITEMS_FILE, "category", (category >= 0) & (category < n_cat), f"outside [0, {n_cat})")
    _require(ITEMS_FILE, "duration_s", items["duration_s"].to_numpy() > 0, "durations must be positive")
    _require_world(ITEMS_FILE, "category", category, world.item_category)
    _require_world(ITEMS_FILE, "duration_s", items["duration_s"].to_numpy(), world.item_duration.float())


def _check_transitions(t: pa.Table, users: pa.Table, items: pa.Table, cfg: Config) -> None:
    """Cross-row and cross-table rules: ids, positions, request chaining, the page shown, then the sessions."""
    f = TRANSITIONS_FILE
    ids = t["request_id"].to_numpy()
    session, step = t["session_id"].to_numpy(), t["step"].to_numpy().astype(np.int64)
    _require_unique(f, "request_id", ids)
    _require(f, "session_id", session >= 0, "negative session ids")
    max_requests = cfg.session.max_requests
    _require(f, "step", (step >= 0) & (step < max_requests), f"outside [0, {max_requests})")
    _require(
        f, "request_id", ids == request_id(session, step, cfg), "not session_id * (max_requests + 1) + step"
    )
    _require_ids(f, t, "user_id", users["user_id"].to_numpy(), "users")
    known_items = items["item_id"].to_numpy()
    for column in ("pool_item_ids", "shown_item_ids", "history_item_ids"):
        _require_ids(f, t, column, known_items, "items")
    pool = cfg.cascade.pool_size
    for stage in cfg.cascade.stages:
        column = candidates_column(stage.name)
        positions = list_matrix(t, column, stage.keep)
        _require(
            f, column, ((positions >= 0) & (positions < pool)).all(1), f"pool positions outside [0, {pool})"
        )
    done = t["done"].to_numpy()
    nxt = t["next_request_id"]
    _require(
        f,
        "next_request_id",
        nxt.is_null().to_numpy(zero_copy_only=False) == done,
        "must be null exactly when done",
    )
    _require(f, "next_request_id", done | (nxt.fill_null(-1).to_numpy() == ids + 1), "must be request_id + 1")
    _require(f, "next_request_id", done | np.isin(ids + 1, ids), "the next request is missing from the log")
    window = cfg.session.history_window
    lengths = pc.list_value_length(t["history_item_ids"]).to_numpy(zero_copy_only=False)
    _require(f, "history_item_ids", lengths <= window, f"longer than session.history_window ({window})")
    k = cfg.cascade.page_size
    pages = _Pages(
        shown=list_matrix(t, "shown_item_ids", k),
        viewed=list_matrix(t, "viewed", k),
        watch=list_matrix(t, "watch_time_s", k),
        reward=t["reward"].to_numpy(),
    )
    duration = items["duration_s"].to_numpy()[pages.shown]
    within = (pages.watch >= 0) & (pages.watch <= duration)
    _require(f, "watch_time_s", within.all(1), "outside [0, the item's duration]")
    _require(
        f,
        "reward",
        np.isclose(pages.reward, pages.watch.sum(1, dtype=np.float64), rtol=1e-5, atol=1e-3),
        "not the page's watch time (the sum of watch_time_s)",
    )
    page = list_matrix(t, candidates_column(cfg.cascade.stages[-1].name), k)
    shown = np.take_along_axis(list_matrix(t, "pool_item_ids", pool), page.astype(np.int64), axis=1)
    _require(
        f,
        "shown_item_ids",
        (shown == pages.shown).all(1),
        "not the pool items at the last stage's candidates",
    )
    _check_sessions(t, ids, step, done, pages, duration, cfg)


@dataclass(frozen=True)
class _Pages:
    """[rows, K] of what each logged page showed and how it was answered, read once for every rule."""

    shown: np.ndarray
    viewed: np.ndarray
    watch: np.ndarray
    reward: np.ndarray
    """[rows] the page's watch time"""


def _check_sessions(
    t: pa.Table,
    ids: np.ndarray,
    step: np.ndarray,
    done: np.ndarray,
    pages: _Pages,
    duration: np.ndarray,
    cfg: Config,
) -> None:
    """Each session is one user's chain of requests from step 0 to its done request, in time, and the session
    state each request logs (counts, watch time, last watch fraction, history) is the start state at step 0 and
    then what the previous request's page added: the trainer and the features read that state."""
    f = TRANSITIONS_FILE
    order = np.argsort(ids)

    def row_of(wanted: np.ndarray) -> np.ndarray:
        """Row of each id in ``wanted``; ids not in the log map to some row, so callers mask those out."""
        return order[np.searchsorted(ids, wanted, sorter=order).clip(max=ids.size - 1)]

    previous = row_of(ids - 1)
    has_previous = (ids[previous] == ids - 1) & ~done[previous]
    _require(
        f,
        "step",
        (step == 0) | has_previous,
        "a request after step 0 without its session's previous request, or after its done request",
    )
    first = step == 0
    items = t["session_items_watched"].to_numpy()
    watch = t["session_watch_time_s"].to_numpy()
    fraction = t["last_watch_fraction"].to_numpy()
    window = cfg.session.history_window
    history = _left_padded(t["history_item_ids"], window)
    _require(f, "session_items_watched", ~first | (items == 0), "not 0 at a session's first request")
    _require(f, "session_watch_time_s", ~first | (watch == 0), "not 0 at a session's first request")
    _require(f, "last_watch_fraction", ~first | (fraction == 0.5), "not 0.5 at a session's first request")
    _require(f, "history_item_ids", ~first | (history < 0).all(1), "not empty at a session's first request")

    # every row after step 0 has a previous row (checked above): compare it with what that row's page added
    later = np.flatnonzero(~first)
    before = previous[later]

    def require_pairs(column: str, ok: np.ndarray, problem: str) -> None:
        """``ok``: one flag per row of ``later``; the rows named are those rows."""
        per_row = np.ones(ids.size, dtype=bool)
        per_row[later[~ok]] = False
        _require(f, column, per_row, problem)

    users = t["user_id"].to_numpy()
    require_pairs("user_id", users[later] == users[before], "not the user of the session's previous request")
    time = t["event_timestamp"].cast(pa.int64()).to_numpy()
    require_pairs("event_timestamp", time[later] > time[before], "not after the session's previous request")
    viewed = pages.viewed[before]
    n_viewed = viewed.sum(1)
    require_pairs(
        "session_items_watched",
        items[later] == items[before] + n_viewed,
        "not the previous request's count plus the items its page had viewed",
    )
    reward = pages.reward.astype(np.float64)
    require_pairs(
        "session_watch_time_s",
        np.isclose(watch[later], watch[before] + reward[before], rtol=1e-5, atol=1e-3),
        "not the previous request's watch time plus its page's reward",
    )
    fractions = pages.watch[before].astype(np.float64) / duration[before]
    page_fraction = np.where(viewed, fractions, 0.0).sum(1) / np.maximum(n_viewed, 1)
    require_pairs(
        "last_watch_fraction",
        np.isclose(
            fraction[later], np.where(n_viewed > 0, page_fraction, fraction[before]), rtol=1e-4, atol=1e-6
        ),
        "not the mean watch fraction of the previous request's viewed items (kept when none was viewed)",
    )
    # the history grows by the page's viewed items in page order and keeps the last ``window``
    viewed_first = np.argsort(~viewed, axis=1, kind="stable")
    grown = np.concatenate(
        [history[before], np.take_along_axis(pages.shown[before], viewed_first, 1)], axis=1
    )
    kept = np.take_along_axis(grown, np.arange(window)[None, :] + n_viewed[:, None], axis=1)
    require_pairs(
        "history_item_ids",
        (history[later] == kept).all(1),
        f"not the previous request's history plus its page's viewed items (the last {window})",
    )


def _left_padded(col: pa.ChunkedArray, width: int) -> np.ndarray:
    """[rows, width] of a list column of at most ``width`` values per row, each row right-aligned, -1 before it
    (the simulator's own layout of a history). Callers check the lengths first: a longer row would wrap around."""
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    flat = pc.list_flatten(col).to_numpy()
    out = np.full((lengths.size, width), -1, dtype=np.int64)
    rows = np.repeat(np.arange(lengths.size), lengths)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    out[rows, width - np.repeat(lengths, lengths) + np.arange(flat.size) - starts] = flat
    return out
