"""The point-in-time training set as a training input: checked against the logs it was joined for, then hashed.

The trainer replays the logged transitions themselves (tau^1 is rebuilt from the logged pool and predictions);
the training set is the Feast view of the same requests. Before training on the logs we require that the training
set covers exactly those requests (same request ids, users, pages and timestamps, in order) and carries the
training feature service's columns, and record its sha256 in the export's ``training_data``, so an artifact names
the exact feature snapshot it was trained beside and a stale or mismatched training set stops the run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from unexrl.contracts.actors import TrainingSetRecord
from unexrl.data import read_logs
from unexrl.features import schema as fs
from unexrl.io import sha256_file


class TrainingSetMismatch(ValueError):
    """The training set does not belong to the logs it is trained with."""


def verify_training_set(path: Path, logs: Path) -> TrainingSetRecord:
    """Check ``path`` against the validated logs at ``logs``; return its provenance (file, sha256, rows, service)."""
    path = Path(path)
    if not path.is_file():
        raise TrainingSetMismatch(f"no training set at {path}")
    table = pq.read_table(path)
    meta = table.schema.metadata or {}
    service = meta.get(b"feature_service", b"").decode()
    if service != fs.TRAINING_SERVICE:
        raise TrainingSetMismatch(f"{path}: feature_service {service!r}, expected {fs.TRAINING_SERVICE!r}")
    wanted = ["request_id", fs.TIMESTAMP, fs.USER.join_key, "shown_item_ids"] + [
        f"{view.name}__{feature.name}"
        for view in fs.SERVICES[fs.TRAINING_SERVICE]
        for feature in view.features
    ]
    missing = [c for c in wanted if c not in table.column_names]
    if missing:
        raise TrainingSetMismatch(f"{path}: missing columns {missing}")
    transitions = read_logs(Path(logs)).transitions.sort_by("request_id")
    if table.num_rows != transitions.num_rows:
        raise TrainingSetMismatch(
            f"{path}: {table.num_rows} rows for {transitions.num_rows} logged requests in {logs}"
        )
    for column in ("request_id", fs.TIMESTAMP, fs.USER.join_key, "shown_item_ids"):
        got = table[column].combine_chunks()
        want = transitions[column].combine_chunks()
        if column == "shown_item_ids":
            got, want = got.flatten(), want.flatten()
        bad = np.flatnonzero(
            np.asarray(got.to_numpy(zero_copy_only=False)) != np.asarray(want.to_numpy(zero_copy_only=False))
        )
        if column == "shown_item_ids":  # flattened pages: positions -> rows
            bad = np.unique(bad // max(1, len(got) // max(1, table.num_rows)))
        if bad.size:
            raise TrainingSetMismatch(
                f"{path}: column {column!r} differs from the logs' transitions at rows {bad[:5].tolist()}"
                f" ({bad.size} in all): built from other logs?"
            )
    return TrainingSetRecord(
        file=str(path), sha256=sha256_file(path), rows=table.num_rows, feature_service=service
    )
