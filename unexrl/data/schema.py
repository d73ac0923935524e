"""The logged-data contract: Arrow schemas of the three tables, derived from the config.

One function of the config builds each schema, so the writer, the reader and anything downstream (feature
store, trainer) agree on column names, dtypes and fixed list sizes without a hand-kept copy.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import pyarrow as pa

from unexrl.config import Config
from unexrl.contracts import files
from unexrl.contracts.logs import LogManifest

SCHEMA_VERSION = LogManifest.SCHEMA_VERSION
"""Bumped (in unexrl/contracts/logs.py) on any incompatible change to the tables or the manifest."""

USERS_FILE = files.USERS
ITEMS_FILE = files.ITEMS
TRANSITIONS_FILE = files.TRANSITIONS
MANIFEST_FILE = files.MANIFEST
TABLE_FILES = files.LOG_TABLES

SESSION_SPACING_S = 30
"""Seconds between the starts of consecutive session ids in event timestamps."""

TIMESTAMP = pa.timestamp("us", tz="UTC")


def pred_column(stage: str) -> str:
    """Column of stage ``stage``'s predictions for the whole pool, [P * d_i] row-major."""
    return f"pred_{stage}"


def action_column(stage: str) -> str:
    """Column of stage ``stage``'s logged action, [d_i]."""
    return f"action_{stage}"


def candidates_column(stage: str) -> str:
    """Column of the pool positions stage ``stage`` kept, [K_i]."""
    return f"candidates_{stage}"


IntLike = TypeVar("IntLike", int, np.ndarray)


def request_id(session: IntLike, step: IntLike, cfg: Config) -> IntLike:
    """Unique id of a request: a session has at most ``max_requests`` steps, so ids never collide."""
    return session * (cfg.session.max_requests + 1) + step


def users_schema() -> pa.Schema:
    """Observable user attributes only: the hidden behaviour type is never logged."""
    return pa.schema(
        [
            pa.field("user_id", pa.int64(), nullable=False),
            pa.field("activity_group", pa.int32(), nullable=False),
        ]
    )


def items_schema() -> pa.Schema:
    return pa.schema(
        [
            pa.field("item_id", pa.int64(), nullable=False),
            pa.field("category", pa.int32(), nullable=False),
            pa.field("duration_s", pa.float32(), nullable=False),
        ]
    )


def _fixed(value: pa.DataType, size: int) -> pa.DataType:
    return pa.list_(pa.field("item", value, nullable=False), size)


def transitions_schema(cfg: Config) -> pa.Schema:
    """One row per served request; list sizes come from the cascade config (P, d_i, K_i)."""
    stages = cfg.cascade.stages
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ValueError(f"cascade stage names must be unique to name log columns, got {names}")
    pool, page = cfg.cascade.pool_size, cfg.cascade.page_size
    fields = [
        pa.field("request_id", pa.int64(), nullable=False),
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("session_id", pa.int64(), nullable=False),
        pa.field("event_timestamp", TIMESTAMP, nullable=False),
        pa.field("step", pa.int32(), nullable=False),
        pa.field("session_items_watched", pa.int32(), nullable=False),
        pa.field("session_watch_time_s", pa.float32(), nullable=False),
        pa.field("last_watch_fraction", pa.float32(), nullable=False),
        pa.field("history_item_ids", pa.list_(pa.field("item", pa.int64(), nullable=False)), nullable=False),
        pa.field("pool_item_ids", _fixed(pa.int64(), pool), nullable=False),
    ]
    for stage in stages:
        d = len(stage.heads)
        fields += [
            pa.field(pred_column(stage.name), _fixed(pa.float16(), pool * d), nullable=False),
            pa.field(action_column(stage.name), _fixed(pa.float32(), d), nullable=False),
            pa.field(candidates_column(stage.name), _fixed(pa.int32(), stage.keep), nullable=False),
        ]
    fields += [
        pa.field("shown_item_ids", _fixed(pa.int64(), page), nullable=False),
        pa.field("watch_time_s", _fixed(pa.float32(), page), nullable=False),
        pa.field("click", _fixed(pa.bool_(), page), nullable=False),
        pa.field("like", _fixed(pa.bool_(), page), nullable=False),
        pa.field("viewed", _fixed(pa.bool_(), page), nullable=False),
        pa.field("reward", pa.float32(), nullable=False),
        pa.field("done", pa.bool_(), nullable=False),
        pa.field("next_request_id", pa.int64(), nullable=True),
    ]
    return pa.schema(fields)
