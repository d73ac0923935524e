"""The point-in-time training set as a training input: checked against the logs it was joined for, then hashed.

The trainer replays the logged transitions themselves (tau^1 is rebuilt from the logged pool and predictions);
the training set is the Feast view of the same requests. Before training on the logs we require that the training
set covers exactly those requests (same request ids, users, pages and timestamps, in order) and carries the
training feature service's columns with their types and finite values, and record its sha256 in the export's
``training_data``, so an artifact names the exact feature snapshot it was trained beside and a stale or
mismatched training set stops the run. The file is read once: the table returned is the one checked and hashed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from unexrl.contracts.actors import TrainingSetRecord
from unexrl.data import LoggedData
from unexrl.features import schema as fs
from unexrl.io import read_parquet_hashed


class TrainingSetMismatch(ValueError):
    """The training set is not a valid point-in-time training set of the logs it is trained with."""


@dataclass(frozen=True)
class CheckedTrainingSet:
    """A training set that passed :func:`verify_training_set`: its table and its provenance, of the same bytes."""

    table: pa.Table
    record: TrainingSetRecord


def precheck_training_set(path: Path, logged_requests: int, page_size: int) -> None:
    """What the Parquet footer of ``path`` alone can show wrong (feature service, columns, types, row count), so
    that a run fails before CEM tuning and sharding; :func:`verify_training_set` checks the data when it is read."""
    path = Path(path)
    if not path.is_file():
        raise TrainingSetMismatch(f"no training set at {path}")
    try:
        with pq.ParquetFile(path) as file:
            schema, rows = file.schema_arrow, file.metadata.num_rows
    except (pa.ArrowException, OSError) as err:
        raise TrainingSetMismatch(f"{path}: not a readable Parquet file: {err}") from None
    _check_schema(schema, rows, logged_requests, page_size, path)


def verify_training_set(path: Path, logs: LoggedData) -> CheckedTrainingSet:
    """Read ``path`` once and check it against the validated ``logs``: the training service's columns with their
    types, finite feature values (a null is a request before the view's first row, and allowed), and the logged
    requests' keys, row for row. TrainingSetMismatch names the column and the first bad rows."""
    path = Path(path)
    if not path.is_file():
        raise TrainingSetMismatch(f"no training set at {path}")
    try:
        table, sha256 = read_parquet_hashed(path)
    except (pa.ArrowException, OSError) as err:
        raise TrainingSetMismatch(f"{path}: not a readable Parquet file: {err}") from None
    page_size = logs.config.cascade.page_size
    _check_schema(table.schema, table.num_rows, logs.transitions.num_rows, page_size, path)
    keys = ["request_id", fs.TIMESTAMP, fs.USER.join_key, "shown_item_ids"]
    # the training set is in request order (assemble_training_set); only the keys of the logs are sorted to match
    logged = logs.transitions.select(keys).sort_by("request_id")
    for column in keys:
        got, want = (_values(t[column]) for t in (table, logged))
        bad = _rows(
            table[column],
            np.asarray(got.to_numpy(zero_copy_only=False)) != want.to_numpy(zero_copy_only=False),
        )
        if bad.size:
            raise TrainingSetMismatch(
                f"{path}: column {column!r} differs from the logs' transitions at rows {bad[:5].tolist()} (logged "
                f"request ids {logged['request_id'].take(bad[:5]).to_pylist()}; {bad.size} rows in all): built "
                "from other logs?"
            )
    for name in _expected_types(page_size):
        values = _values(table[name])
        if pa.types.is_floating(values.type):
            finite = pc.fill_null(pc.is_finite(values), True).to_numpy(zero_copy_only=False)
            bad = _rows(table[name], ~np.asarray(finite, dtype=bool))
            if bad.size:
                raise TrainingSetMismatch(
                    f"{path}: column {name!r} holds NaN or infinite values at rows {bad[:5].tolist()}"
                    f" ({bad.size} in all)"
                )
    record = TrainingSetRecord(
        file=str(path), sha256=sha256, rows=table.num_rows, feature_service=_service(table.schema)
    )
    return CheckedTrainingSet(table=table, record=record)


def _service(schema: pa.Schema) -> str:
    """The feature service a training set's Parquet metadata names ("" when none)."""
    return (schema.metadata or {}).get(b"feature_service", b"").decode()


def _check_schema(schema: pa.Schema, rows: int, logged_requests: int, page_size: int, path: Path) -> None:
    service = _service(schema)
    if service != fs.TRAINING_SERVICE:
        raise TrainingSetMismatch(f"{path}: feature_service {service!r}, expected {fs.TRAINING_SERVICE!r}")
    expected = _expected_types(page_size)
    missing = [c for c in expected if c not in schema.names]
    if missing:
        raise TrainingSetMismatch(f"{path}: missing columns {missing}")
    repeated = sorted({c for c in schema.names if schema.names.count(c) > 1})
    if repeated:
        raise TrainingSetMismatch(f"{path}: columns {repeated} appear more than once")
    for name, want in expected.items():
        got = schema.field(name).type
        if not _same_type(got, want):
            raise TrainingSetMismatch(f"{path}: column {name!r} is {got}, expected {want}")
    if rows != logged_requests:
        raise TrainingSetMismatch(f"{path}: {rows} rows for {logged_requests} logged requests")


def _expected_types(page_size: int) -> dict[str, pa.DataType]:
    """Every column of the training service and the keys, with its type as
    ``unexrl.features.store.assemble_training_set`` writes it: user features one value per request, item features
    one per shown position. The trainer reads the keys and the user features; all are checked."""
    out = {
        "request_id": pa.int64(),
        fs.TIMESTAMP: fs.TIMESTAMP_TYPE,
        fs.USER.join_key: pa.int64(),
        "shown_item_ids": pa.list_(pa.int64(), page_size),
    }
    for view in fs.SERVICES[fs.TRAINING_SERVICE]:
        for feature in view.features:
            value = fs.ARROW_TYPES[feature.dtype]
            out[f"{view.name}__{feature.name}"] = (
                value if view.entity is fs.USER else pa.list_(value, page_size)
            )
    return out


def _same_type(got: pa.DataType, want: pa.DataType) -> bool:
    """Equal types, list child names aside (a Parquet round trip may rename a list's ``item`` to ``element``)."""
    if pa.types.is_fixed_size_list(want):
        return (
            pa.types.is_fixed_size_list(got)
            and got.list_size == want.list_size
            and got.value_type == want.value_type
        )
    if pa.types.is_list(want):
        return pa.types.is_list(got) and got.value_type == want.value_type
    return got == want


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_fixed_size_list(t)


def _values(column: pa.ChunkedArray) -> pa.Array:
    """A column's values, a list column's elements flattened in row order."""
    array = column.combine_chunks()
    return pc.list_flatten(array) if _is_list(array.type) else array


def _rows(column: pa.ChunkedArray, hits: np.ndarray) -> np.ndarray:
    """The rows of ``column`` holding a value flagged in ``hits`` (a mask over :func:`_values`)."""
    at = np.flatnonzero(hits)
    if _is_list(column.type):
        at = np.asarray(pc.list_parent_indices(column.combine_chunks()))[at]
    return np.unique(at)
