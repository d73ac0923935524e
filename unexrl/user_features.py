"""The one function from a user's feature row to the actors' and critic's dense input, and its defaults.

Whatever produced the row, the model sees the same numbers: a row of the point-in-time training set (offline
training), the simulator's running aggregates (online training, evaluation: unexrl/sim/behaviour.py), or the
online store (serving). Rows are columns named ``<view>__<feature>`` as Feast returns them with full feature
names; a missing column or a null value (a request before the user's first complete feedback, a user the store
has never seen) takes the view's cold-start default (``unexrl.features.schema.defaults``), so a cold user gets
exactly the same input everywhere.

The transforms are fixed (counts on a log scale, durations relative to the world's median, category shares
relative to uniform); the networks' Standardize layers scale the result.

A top-level module with no unexrl dependency but the config: the simulator (unexrl/sim/behaviour.py), the
learner (unexrl/rl), the feature store (unexrl/features/schema.py takes the view's defaults from here) and serving
all use it, and none of them may import another's package for it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from unexrl.config import Config

VIEW = "user_behaviour"
"""the feature view (unexrl.features.schema.USER_BEHAVIOUR) whose row is the input"""
SCALARS = (
    "requests",
    "sessions",
    "items_viewed",
    "watch_time_s",
    "mean_watch_time_s",
    "mean_watch_fraction",
    "mean_viewed_duration_s",
    "click_rate",
    "like_rate",
    "recent_watch_fraction",
)
"""user_behaviour's scalar features on the model's path, in input order; category_watch_share follows them"""
SHARE = "category_watch_share"
COLUMNS = tuple(f"{VIEW}__{name}" for name in (*SCALARS, SHARE))
"""the feature-row columns the input reads"""


def behaviour_defaults(cfg: Config) -> dict[str, Any]:
    """user_behaviour's cold-start values: a user without complete feedback yet (counts 0, the neutral watch
    fraction 0.5 the simulator also starts sessions with, a median-length taste, uniform category shares)."""
    n_cat = cfg.world.n_categories
    return {
        "requests": 0,
        "sessions": 0,
        "items_viewed": 0,
        "watch_time_s": 0.0,
        "mean_watch_time_s": 0.0,
        "mean_watch_fraction": 0.5,
        "mean_viewed_duration_s": cfg.world.duration_median_s,
        "click_rate": 0.0,
        "like_rate": 0.0,
        "recent_watch_fraction": 0.5,
        "category_watch_share": [1.0 / n_cat] * n_cat,
        "recent_item_ids": [],
        "recent_category_ids": [],
        "recent_watch_fractions": [],
    }


def input_dim(cfg: Config) -> int:
    """Width of :func:`user_inputs`: the scalars and one share per category."""
    return len(SCALARS) + cfg.world.n_categories


def user_inputs(rows: Mapping[str, Any], cfg: Config) -> Tensor:
    """[B, input_dim] float32 model input of B feature rows (columns of :data:`COLUMNS`, each B values).

    A column may be a list, a numpy array, a torch tensor or a pyarrow array; nulls take the defaults.
    """
    n = _rows(rows)
    default = behaviour_defaults(cfg)
    col = {
        name: _column(rows.get(column), n, np.asarray(default[name], dtype=np.float64), column)
        for name, column in zip((*SCALARS, SHARE), COLUMNS)
    }
    median = cfg.world.duration_median_s
    x = np.column_stack(
        [
            np.log1p(col["requests"]) / 5.0,
            np.log1p(col["sessions"]) / 3.0,
            np.log1p(col["items_viewed"]) / 6.0,
            np.log1p(col["watch_time_s"]) / 10.0,
            col["mean_watch_time_s"] / median,
            col["mean_watch_fraction"],
            np.log(np.maximum(col["mean_viewed_duration_s"], 1e-3) / median),
            col["click_rate"],
            col["like_rate"],
            col["recent_watch_fraction"],
            col[SHARE] * cfg.world.n_categories,
        ]
    )
    return torch.from_numpy(x.astype(np.float32))


def served_inputs(user: Mapping[str, Any], cfg: Config) -> Tensor:
    """[1, input_dim] the input of one user row as the online store serves it (``OnlineFeatures.user``)."""
    return user_inputs({name: [user.get(name)] for name in COLUMNS}, cfg)


def cold_inputs(n: int, cfg: Config) -> Tensor:
    """[n, input_dim] the input of users without any feature row (every value its default)."""
    return user_inputs({COLUMNS[0]: [None] * n}, cfg)


def _rows(rows: Mapping[str, Any]) -> int:
    lengths = {len(v) for name, v in rows.items() if name in COLUMNS and v is not None}
    if len(lengths) > 1:
        raise ValueError(f"feature row columns differ in length: {sorted(lengths)}")
    if not lengths:
        raise ValueError(f"no user feature columns among {sorted(rows)[:8]}: expected {COLUMNS[0]}, ...")
    return lengths.pop()


def _column(column: Any, n: int, default: np.ndarray, name: str) -> np.ndarray:
    """One column as float64 rows ([n], or [n, width] for a list feature); nulls take ``default``."""
    out = np.empty((n, *default.shape))
    out[:] = default
    if column is None:
        return out
    if isinstance(column, Tensor):
        column = column.detach().cpu().numpy()
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if isinstance(column, np.ndarray) and column.dtype != object:
        present, values = np.ones(n, dtype=bool), column
    elif isinstance(column, pa.Array):  # convert the valid values in one go
        present = ~np.asarray(column.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        valid = column.drop_null()
        values = (valid.flatten() if default.ndim else valid).to_numpy(zero_copy_only=False)
    else:  # a sequence, None (or NaN) for a null
        items = list(column)
        present = np.array([v is not None and not (isinstance(v, float) and math.isnan(v)) for v in items])
        values = [v for v, keep in zip(items, present) if keep]
    try:
        out[present] = np.asarray(values, dtype=np.float64).reshape(int(present.sum()), *default.shape)
    except ValueError:
        raise ValueError(f"{name}: expected {n} values of shape {default.shape}") from None
    return out
