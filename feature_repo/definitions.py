"""Feast definitions of UNEX-RL: entities, batch sources, feature views, feature services, the session push.

Every view and column comes from ``unexrl.features.schema`` (the one feature contract), so these
definitions, the tables ``unexrl features build`` writes and the serving defaults cannot drift apart.

Two environment variables, set by ``unexrl features materialize`` (set them yourself for ``feast apply``):
- ``UNEXRL_FEATURES_URI``: where the feature tables are (local path or object-storage URI);
  default ``data/features`` in this folder.
- ``UNEXRL_FEATURE_ENV``: the environment (``local``, ``redis``, ``production``). Production's offline store
  is Spark, which reads the same Parquet tables through SparkSource; every other environment reads them
  with DuckDB through FileSource. Entities, views and services are the same everywhere.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

from feast import Entity, FeatureService, FeatureView, Field, FileSource, PushSource, ValueType
from feast.data_source import DataSource
from feast.types import Array, Float32, Int64

from unexrl.features import schema as fs

FEATURES_URI = os.environ.get(
    "UNEXRL_FEATURES_URI", str(Path(__file__).resolve().parent / "data" / "features")
)
ENVIRONMENT = os.environ.get("UNEXRL_FEATURE_ENV", "local")
SPARK_ENVIRONMENTS = frozenset({"production"})
FEAST_TYPES = {"int64": Int64, "float32": Float32, "int64_list": Array(Int64), "float32_list": Array(Float32)}


def _entity(spec: fs.EntitySpec) -> Entity:
    return Entity(name=spec.name, join_keys=[spec.join_key], value_type=ValueType.INT64, description=spec.doc)


def _batch_source(view: fs.ViewSpec) -> DataSource:
    path = f"{FEATURES_URI.rstrip('/')}/{view.file}"
    if ENVIRONMENT in SPARK_ENVIRONMENTS:
        from feast.infra.offline_stores.contrib.spark_offline_store.spark_source import SparkSource

        return SparkSource(
            name=f"{view.name}_source", path=path, file_format="parquet", timestamp_field=fs.TIMESTAMP
        )
    return FileSource(name=f"{view.name}_source", path=path, timestamp_field=fs.TIMESTAMP)


def _view(spec: fs.ViewSpec, source: DataSource, entity: Entity) -> FeatureView:
    return FeatureView(
        name=spec.name,
        entities=[entity],
        ttl=timedelta(seconds=spec.ttl_s),
        schema=[Field(name=f.name, dtype=FEAST_TYPES[f.dtype], description=f.doc) for f in spec.features],
        source=source,
        online=True,
        description=spec.doc,
    )


user = _entity(fs.USER)
item = _entity(fs.ITEM)
cqr_cell = _entity(fs.CQR_CELL)


def _push_source(view: fs.ViewSpec) -> PushSource:
    """Serving writes the view's fresh rows online through this; offline it reads the view's batch table."""
    return PushSource(name=view.push_source, batch_source=_batch_source(view))


user_behaviour_push = _push_source(fs.USER_BEHAVIOUR)
user_session_push = _push_source(fs.USER_SESSION)

user_profile = _view(fs.USER_PROFILE, _batch_source(fs.USER_PROFILE), user)
user_behaviour = _view(fs.USER_BEHAVIOUR, user_behaviour_push, user)
user_session = _view(fs.USER_SESSION, user_session_push, user)
item_profile = _view(fs.ITEM_PROFILE, _batch_source(fs.ITEM_PROFILE), item)
item_stats = _view(fs.ITEM_STATS, _batch_source(fs.ITEM_STATS), item)
cqr_knots = _view(fs.CQR_KNOTS, _batch_source(fs.CQR_KNOTS), cqr_cell)

_VIEWS = {
    v.name: v for v in (user_profile, user_behaviour, user_session, item_profile, item_stats, cqr_knots)
}
training = FeatureService(
    name=fs.TRAINING_SERVICE,
    features=[_VIEWS[v.name] for v in fs.SERVICES[fs.TRAINING_SERVICE]],
    description="point-in-time training sets: one row per logged request and shown item",
)
serving_user = FeatureService(
    name=fs.USER_SERVING_SERVICE,
    features=[_VIEWS[v.name] for v in fs.SERVICES[fs.USER_SERVING_SERVICE]],
    description="online: the requesting user",
)
serving_item = FeatureService(
    name=fs.ITEM_SERVING_SERVICE,
    features=[_VIEWS[v.name] for v in fs.SERVICES[fs.ITEM_SERVING_SERVICE]],
    description="online: the candidate items",
)
