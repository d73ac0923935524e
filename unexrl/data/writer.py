"""Write simulator steps as the logged-data contract (schemas in :mod:`unexrl.data.schema`, docs/data.md).

Everything is written into a temporary sibling directory that is renamed into place only by
:meth:`LogWriter.close`, so a crashed or aborted run never leaves a half-written log where a reader would find it.
"""

from __future__ import annotations

import shutil
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from torch import Tensor

from unexrl.config import Config
from unexrl.contracts.logs import LogManifest, TableEntry
from unexrl.data.schema import (
    ITEMS_FILE,
    MANIFEST_FILE,
    SESSION_SPACING_S,
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
from unexrl.io import check_publishable, replace_directory, sha256_file
from unexrl.sim.env import Step
from unexrl.sim.world import World

COMPRESSION = "zstd"
"""Parquet codec: smaller than snappy here (about 9% on transitions, 40% on users and items; docs/data.md)."""


def _start_us(start_time: str) -> int:
    """Microseconds since the epoch of ``logging.start_time``; a time without a zone would be ambiguous."""
    start = datetime.fromisoformat(start_time)
    if start.tzinfo is None:
        raise ValueError(f"logging.start_time {start_time!r} needs a time zone (e.g. a trailing Z)")
    return (start - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


def _fixed(matrix: np.ndarray, type_: pa.DataType) -> pa.Array:
    """[rows, n] numpy -> fixed_size_list<value, n> without a per-row Python loop."""
    values = pa.array(np.ascontiguousarray(matrix).reshape(-1), type=type_.value_type)
    return pa.FixedSizeListArray.from_arrays(values, type=type_)


class LogWriter:
    """Accumulates :class:`Step` batches into Parquet row groups and publishes the log directory on close.

    Use it as a context manager (``with LogWriter(...) as w: ...; w.close(...)``) so an exception between
    construction and close removes the temporary directory.
    """

    def __init__(
        self, cfg: Config, world: World, out_dir: Path, overwrite: bool = False, row_group_rows: int = 2048
    ) -> None:
        self.cfg, self.world = cfg, world
        self.out_dir = Path(out_dir)
        self.overwrite = overwrite
        self.row_group_rows = row_group_rows
        check_publishable(self.out_dir, overwrite, "log directory")
        self.schema = transitions_schema(cfg)
        self._start_us = _start_us(cfg.logging.start_time)
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        # A sibling: same file system, so the final rename is atomic; mkdir honours the umask (mkdtemp does not).
        self._tmp = self.out_dir.with_name(f".{self.out_dir.name}.tmp-{uuid.uuid4().hex}")
        self._tmp.mkdir()
        try:
            self._writer = pq.ParquetWriter(
                self._tmp / TRANSITIONS_FILE, self.schema, compression=COMPRESSION
            )
        except BaseException:
            shutil.rmtree(self._tmp)
            raise
        self._buffer: list[pa.RecordBatch] = []
        self._buffered = 0
        self._request_ids: list[np.ndarray] = []
        self._open = True

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._open:
            return
        self.abort()
        if exc_type is None:
            raise RuntimeError("LogWriter left without close(behaviour, seeds): the log was discarded")

    def add(self, step: Step) -> None:
        """Buffer the active rows of one batched request; flush a row group once enough rows are buffered."""
        self._require_open()
        batch = self._batch(step)
        if batch.num_rows == 0:
            return
        self._buffer.append(batch)
        self._buffered += batch.num_rows
        self._request_ids.append(batch.column("request_id").to_numpy())
        if self._buffered >= self.row_group_rows:
            self._flush()

    def close(self, behaviour: dict[str, Any], seeds: list[int]) -> Path:
        """Finish the tables, write the manifest and rename the directory into place; returns ``out_dir``."""
        self._require_open()
        try:
            self._flush()
            self._writer.close()
            self._check_unique_requests()
            pq.write_table(self._users(), self._tmp / USERS_FILE, compression=COMPRESSION)
            pq.write_table(self._items(), self._tmp / ITEMS_FILE, compression=COMPRESSION)
            rows = {
                USERS_FILE: self.world.n_users,
                ITEMS_FILE: self.world.n_items,
                TRANSITIONS_FILE: int(sum(len(r) for r in self._request_ids)),
            }
            LogManifest(
                created_at=datetime.now(UTC),
                config=self.cfg.to_dict(),
                seeds=[int(s) for s in seeds],
                behaviour=behaviour,
                files={
                    name: TableEntry(rows=n, sha256=sha256_file(self._tmp / name)) for name, n in rows.items()
                },
            ).write(self._tmp / MANIFEST_FILE)
            self._publish()
        except BaseException:
            self.abort()
            raise
        self._open = False
        return self.out_dir

    def abort(self) -> None:
        """Discard everything written so far; the target directory is left untouched."""
        if not self._open:
            return
        self._open = False
        try:
            self._writer.close()
        finally:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def _require_open(self) -> None:
        if not self._open:
            raise RuntimeError(f"LogWriter for {self.out_dir} is already closed or aborted")

    def _flush(self) -> None:
        if not self._buffer:
            return
        table = pa.Table.from_batches(self._buffer, schema=self.schema)
        self._writer.write_table(table, row_group_size=table.num_rows)
        self._buffer, self._buffered = [], 0

    def _check_unique_requests(self) -> None:
        """Two rollouts that reuse session ids collide here; refuse rather than publish ambiguous ids."""
        if not self._request_ids:
            return
        ids, counts = np.unique(np.concatenate(self._request_ids), return_counts=True)
        if (counts > 1).any():
            raise ValueError(
                f"duplicate request_ids {ids[counts > 1][:5].tolist()}: a session id was logged twice; "
                "give every rollout into one log disjoint session ids"
            )

    def _publish(self) -> None:
        """Rename the finished temporary directory onto ``out_dir``, replacing it only when allowed."""
        check_publishable(self.out_dir, self.overwrite, "log directory")
        replace_directory(self._tmp, self.out_dir)

    def _users(self) -> pa.Table:
        w = self.world
        return pa.table(
            {
                "user_id": np.arange(w.n_users, dtype=np.int64),
                "activity_group": w.user_activity_group.cpu().numpy().astype(np.int32),
            },
            schema=users_schema(),
        )

    def _items(self) -> pa.Table:
        w = self.world
        return pa.table(
            {
                "item_id": np.arange(w.n_items, dtype=np.int64),
                "category": w.item_category.cpu().numpy().astype(np.int32),
                "duration_s": w.item_duration.cpu().numpy().astype(np.float32),
            },
            schema=items_schema(),
        )

    def _batch(self, step: Step) -> pa.RecordBatch:
        """The active rows of one step as a record batch in schema order."""
        active = step.active

        def rows(t: Tensor) -> np.ndarray:
            return t[active].detach().cpu().numpy()

        cfg, obs, schema = self.cfg, step.obs, self.schema
        session = rows(obs.session).astype(np.int64)
        steps = rows(obs.step).astype(np.int64)
        ids = request_id(session, steps, cfg)
        watch_time = rows(obs.watch_time).astype(np.float32)
        seconds = steps * cfg.session.seconds_between_requests + watch_time.astype(np.float64)
        timestamp = (
            self._start_us
            + session * SESSION_SPACING_S * 1_000_000
            + np.round(seconds * 1e6).astype(np.int64)
        )
        history = rows(obs.history_items)
        present = history >= 0
        offsets = np.concatenate([[0], np.cumsum(present.sum(1))]).astype(np.int32)
        done = rows(step.done)

        columns: dict[str, pa.Array] = {
            "request_id": pa.array(ids, pa.int64()),
            "user_id": pa.array(rows(obs.user).astype(np.int64)),
            "session_id": pa.array(session),
            "event_timestamp": pa.array(timestamp, schema.field("event_timestamp").type),
            "step": pa.array(steps.astype(np.int32)),
            "session_items_watched": pa.array(rows(obs.items_watched).astype(np.int32)),
            "session_watch_time_s": pa.array(watch_time),
            "last_watch_fraction": pa.array(rows(obs.last_watch_fraction).astype(np.float32)),
            "history_item_ids": pa.ListArray.from_arrays(
                pa.array(offsets),
                pa.array(history[present].astype(np.int64)),
                type=schema.field("history_item_ids").type,
            ),
            "pool_item_ids": _fixed(rows(obs.pool).astype(np.int64), schema.field("pool_item_ids").type),
        }
        for i, stage in enumerate(cfg.cascade.stages):
            pred = rows(obs.predictions[i]).astype(np.float32)
            half = pred.astype(np.float16)
            if not np.array_equal(half.astype(np.float32), pred):
                raise ValueError(
                    f"stage {stage.name}: predictions are not float16-exact; logging would lose precision"
                )
            for name, values in (
                (pred_column(stage.name), half.reshape(len(pred), -1)),
                (action_column(stage.name), rows(step.cascade.actions[i]).astype(np.float32)),
                (candidates_column(stage.name), rows(step.cascade.candidates[i]).astype(np.int32)),
            ):
                columns[name] = _fixed(values, schema.field(name).type)
        response = step.response
        columns |= {
            "shown_item_ids": _fixed(
                rows(step.page_items).astype(np.int64), schema.field("shown_item_ids").type
            ),
            "watch_time_s": _fixed(
                rows(response.watch_time).astype(np.float32), schema.field("watch_time_s").type
            ),
            "click": _fixed(rows(response.click), schema.field("click").type),
            "like": _fixed(rows(response.like), schema.field("like").type),
            "viewed": _fixed(rows(response.viewed), schema.field("viewed").type),
            "reward": pa.array(rows(step.reward).astype(np.float32)),
            "done": pa.array(done),
            "next_request_id": pa.array(ids + 1, pa.int64(), mask=done),
        }
        return pa.RecordBatch.from_arrays([columns[f.name] for f in schema], schema=schema)
