"""The feature contract: entities, feature views, their columns and cold-start defaults, in one place.

The builder writes exactly these columns, ``feature_repo/definitions.py`` declares the Feast views from them,
the training set and the serving client name them, and docs/features.md documents them: one list, so the
offline tables, the registry and the serving defaults cannot drift apart. No Feast import here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import pyarrow as pa
import torch

from unexrl.config import Config
from unexrl.rl import cqr
from unexrl.rl.cqr import duration_bucket
from unexrl.user_features import behaviour_defaults

Dtype = Literal["int64", "float32", "int64_list", "float32_list"]

ARROW_TYPES: dict[str, pa.DataType] = {
    "int64": pa.int64(),
    "float32": pa.float32(),
    "int64_list": pa.list_(pa.int64()),
    "float32_list": pa.list_(pa.float32()),
}
TIMESTAMP = "event_timestamp"
TIMESTAMP_TYPE = pa.timestamp("us", tz="UTC")
SESSION_TTL_S = 1800.0
"""a session's state expires after 30 idle minutes: the next request starts a session from the defaults"""


@dataclass(frozen=True)
class EntitySpec:
    name: str
    join_key: str
    doc: str


@dataclass(frozen=True)
class FeatureSpec:
    name: str
    dtype: Dtype
    doc: str


@dataclass(frozen=True)
class ViewSpec:
    """One Feast feature view and the Parquet table (``<name>.parquet``) the builder writes for it."""

    name: str
    entity: EntitySpec
    features: tuple[FeatureSpec, ...]
    doc: str
    ttl_s: float = 0.0
    """seconds a row stays valid; 0 = until a newer row replaces it (Feast's "no ttl")"""
    pushed: bool = False
    """fed online by serving through a PushSource (:attr:`push_source`) as well as from its batch table"""

    @property
    def file(self) -> str:
        return f"{self.name}.parquet"

    @property
    def push_source(self) -> str:
        """The name of the PushSource that feeds this view (``pushed`` views only)."""
        if not self.pushed:
            raise ValueError(f"feature view {self.name!r} is not fed by a push source")
        return f"{self.name}_push"

    def arrow_schema(self) -> pa.Schema:
        return pa.schema(
            [(self.entity.join_key, pa.int64()), (TIMESTAMP, TIMESTAMP_TYPE)]
            + [(f.name, ARROW_TYPES[f.dtype]) for f in self.features]
        )


USER = EntitySpec("user", "user_id", "a user (users.user_id of the logs)")
ITEM = EntitySpec("item", "item_id", "an item (items.item_id of the logs)")
CQR_CELL = EntitySpec(
    "cqr_cell",
    "cqr_cell_id",
    "a CQR cell (user group G_u, item group G_i): cqr_cell_id = G_u * n_item_groups + G_i",
)
ENTITIES = (USER, ITEM, CQR_CELL)

USER_PROFILE = ViewSpec(
    "user_profile",
    USER,
    (FeatureSpec("activity_group", "int64", "observable activity group G_u (users.activity_group)"),),
    "static user attributes, valid from the log's first request",
)
USER_BEHAVIOUR = ViewSpec(
    "user_behaviour",
    USER,
    (
        FeatureSpec("requests", "int64", "requests of this user whose feedback was complete"),
        FeatureSpec("sessions", "int64", "sessions those requests belong to"),
        FeatureSpec("items_viewed", "int64", "items viewed on those pages"),
        FeatureSpec("watch_time_s", "float32", "total seconds watched"),
        FeatureSpec("mean_watch_time_s", "float32", "mean seconds watched per viewed item"),
        FeatureSpec("mean_watch_fraction", "float32", "mean watch time / duration per viewed item"),
        FeatureSpec("mean_viewed_duration_s", "float32", "mean duration of viewed items (short-video taste)"),
        FeatureSpec("click_rate", "float32", "clicks per viewed item"),
        FeatureSpec("like_rate", "float32", "likes per viewed item"),
        FeatureSpec(
            "recent_watch_fraction", "float32", "mean watch fraction of the last `recent_items` viewed items"
        ),
        FeatureSpec(
            "category_watch_share",
            "float32_list",
            "share of watch time per category, n_categories values summing to 1",
        ),
        FeatureSpec("recent_item_ids", "int64_list", "last `recent_items` viewed item ids, oldest first"),
        FeatureSpec("recent_category_ids", "int64_list", "categories of recent_item_ids"),
        FeatureSpec(
            "recent_watch_fractions",
            "float32_list",
            "watch fractions of recent_item_ids: what serving needs to move the recent window on (serving.md)",
        ),
    ),
    "behaviour aggregates; a row is stamped when a request's feedback is complete (see docs/features.md); "
    "serving pushes each session's fresh row",
    pushed=True,
)
USER_SESSION = ViewSpec(
    "user_session",
    USER,
    (
        FeatureSpec("session_id", "int64", "the user's current session"),
        FeatureSpec("session_step", "int64", "requests already served in the session"),
        FeatureSpec("session_items_watched", "int64", "items viewed so far in the session"),
        FeatureSpec("session_watch_time_s", "float32", "seconds watched so far in the session"),
        FeatureSpec("last_watch_fraction", "float32", "mean watch fraction of the previous page"),
    ),
    "session state at request time; serving pushes fresh rows, the batch table replays the logged ones",
    ttl_s=SESSION_TTL_S,
    pushed=True,
)
ITEM_PROFILE = ViewSpec(
    "item_profile",
    ITEM,
    (
        FeatureSpec("category", "int64", "item category"),
        FeatureSpec("duration_s", "float32", "duration in seconds"),
        FeatureSpec("duration_bucket", "int64", "CQR item group G_i (unexrl.rl.cqr.duration_bucket)"),
    ),
    "static item attributes, valid from the log's first request",
)
ITEM_STATS = ViewSpec(
    "item_stats",
    ITEM,
    (
        FeatureSpec("impressions", "int64", "times shown on a page whose feedback was complete"),
        FeatureSpec("views", "int64", "times viewed"),
        FeatureSpec("view_rate", "float32", "views / impressions"),
        FeatureSpec(
            "quality_estimate",
            "float32",
            "mean watch fraction of views, shrunk to 0.5 with `quality_prior_views` pseudo-views",
        ),
        FeatureSpec("popularity_estimate", "float32", "log(1 + views)"),
        FeatureSpec("like_rate", "float32", "likes per view"),
    ),
    "item statistics from logged feedback; a row is stamped when a page's feedback is complete",
)
CQR_KNOTS = ViewSpec(
    "cqr_knots",
    CQR_CELL,
    (
        FeatureSpec("user_group", "int64", "G_u"),
        FeatureSpec("item_group", "int64", "G_i"),
        FeatureSpec("knots", "float32_list", "`cqr_knots` watch-time quantiles at levels 0, 1/(n-1), ..., 1"),
        FeatureSpec("samples", "int64", "units (pages or viewed items, `cqr_unit`) in the cell the fit used"),
    ),
    "CQR quantile knots, refitted every `cqr_refit_s` on the feedback logged before the refit",
)
VIEWS = (USER_PROFILE, USER_BEHAVIOUR, USER_SESSION, ITEM_PROFILE, ITEM_STATS, CQR_KNOTS)
VIEWS_BY_NAME = {v.name: v for v in VIEWS}

TRAINING_SERVICE = "unexrl_training_v1"
"""user_profile, user_behaviour, item_profile, item_stats: joined per logged request and shown item"""
USER_SERVING_SERVICE = "unexrl_serving_user_v1"
"""user_profile, user_behaviour, user_session: one user row per request"""
ITEM_SERVING_SERVICE = "unexrl_serving_item_v1"
"""item_profile, item_stats: one row per candidate"""
SERVICES: dict[str, tuple[ViewSpec, ...]] = {
    TRAINING_SERVICE: (USER_PROFILE, USER_BEHAVIOUR, ITEM_PROFILE, ITEM_STATS),
    USER_SERVING_SERVICE: (USER_PROFILE, USER_BEHAVIOUR, USER_SESSION),
    ITEM_SERVING_SERVICE: (ITEM_PROFILE, ITEM_STATS),
}


def n_item_groups(cfg: Config) -> int:
    """CQR's item groups G_i (unexrl.rl.cqr.n_item_groups): the cells of the cqr_knots view are G_u x G_i."""
    return cqr.n_item_groups(cfg)


def defaults(cfg: Config) -> dict[str, dict[str, Any]]:
    """Cold-start values per view and feature: what the client serves when the store has no row.

    They describe a user or item the logs have never seen: no history (user_behaviour's, from
    unexrl.user_features: counts 0, the neutral watch fraction 0.5 the simulator also starts sessions with,
    uniform category taste), unknown activity group (-1), a median-length video of unknown category, a session
    at its start, and no fitted CQR knots.
    """
    median = cfg.world.duration_median_s
    bucket = int(duration_bucket(torch.tensor([median]), cfg.features.duration_bucket_edges_s)[0])
    return {
        USER_PROFILE.name: {"activity_group": -1},
        USER_BEHAVIOUR.name: behaviour_defaults(cfg),
        USER_SESSION.name: {
            "session_id": -1,
            "session_step": 0,
            "session_items_watched": 0,
            "session_watch_time_s": 0.0,
            "last_watch_fraction": 0.5,
        },
        ITEM_PROFILE.name: {"category": -1, "duration_s": median, "duration_bucket": bucket},
        ITEM_STATS.name: {
            "impressions": 0,
            "views": 0,
            "view_rate": 0.0,
            "quality_estimate": 0.5,
            "popularity_estimate": 0.0,
            "like_rate": 0.0,
        },
        CQR_KNOTS.name: {"user_group": -1, "item_group": -1, "knots": [], "samples": 0},
    }
