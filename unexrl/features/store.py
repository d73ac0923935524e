"""The Feast store around the feature tables: open an environment, apply, materialise, build training sets.

Feast is imported inside the functions, so importing this module costs nothing without it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import uuid
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from unexrl.bundle import FEATURE_REPO, feature_repo_template
from unexrl.config import Config
from unexrl.data import read_logs
from unexrl.environ import environ
from unexrl.features import published
from unexrl.features import schema as fs
from unexrl.features.build import verify_feature_tables
from unexrl.features.storage import is_local, join, local_directory, normalize, write_parquet

if TYPE_CHECKING:
    from feast import FeatureStore, FeatureView

log = logging.getLogger(__name__)

ENV_FEATURES_URI = "UNEXRL_FEATURES_URI"
ENV_ENVIRONMENT = "UNEXRL_FEATURE_ENV"
DEFINITIONS = "definitions.py"
TRAINING_SET_FILE = "training_features.parquet"
"""written next to the logs' transitions.parquet by default"""


SOURCE_ROOT = Path(__file__).resolve().parents[2]
"""the directory that holds the ``unexrl`` sources: a checkout, or a Bento's src/ (which carries feature_repo/)"""


def repo_path(cfg: Config) -> Path:
    """The Feast repository folder: ``features.repo``, absolute, or relative to the working directory, or to the
    directory beside the sources (a checkout, a Bento); the default (``feature_repo``) is the package's template
    where neither has one (read it, copy it: never write into it, see :func:`writable_repo`)."""
    path = Path(cfg.features.repo)
    if path.is_absolute() or path.is_dir():
        return path
    if (SOURCE_ROOT / path).is_dir():
        return SOURCE_ROOT / path
    if cfg.features.repo == FEATURE_REPO:
        return feature_repo_template()
    raise FileNotFoundError(f"features.repo={cfg.features.repo}: no Feast repository at {path.resolve()}")


def writable_repo(cfg: Config) -> Path:
    """:func:`repo_path`, refused when it is the package's template: applying or materialising writes the
    registry and online store into the repository."""
    path = repo_path(cfg)
    if path == feature_repo_template():
        raise FileNotFoundError(
            f"no ./{FEATURE_REPO} here: `unexrl features init` creates one from the package's template "
            "(or give --set features.repo=DIR)"
        )
    return path


def init_repo(out: Path) -> Path:
    """A new Feast repository at ``out``: a copy of the package's template (``unexrl features init``)."""
    if Path(out).exists():
        raise FileExistsError(f"{out} exists; refusing to overwrite a feature repository")
    shutil.copytree(feature_repo_template(), out, ignore=shutil.ignore_patterns("data", "__pycache__"))
    return Path(out)


def store_yaml(cfg: Config) -> Path:
    """feature_store.yaml of ``features.environment``: the repo's own for local, environments/<name>.yaml else."""
    repo = repo_path(cfg)
    env = cfg.features.environment
    path = repo / "feature_store.yaml" if env == "local" else repo / "environments" / f"{env}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"features.environment={env}: no {path}")
    return path


def open_store(cfg: Config, registry: Path | None = None) -> FeatureStore:
    """A FeatureStore for the configured environment, its yaml's ``${VAR}``s substituted here (a variable that is
    not set is an error naming it; Feast itself would keep the literal text). ``registry``: the registry file to
    read instead of ``${UNEXRL_FEAST_REGISTRY}`` (a serving replica's checked copy of the published one)."""
    import yaml
    from feast import FeatureStore
    from feast.repo_config import RepoConfig

    path = store_yaml(cfg)
    settings = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
    values = {**os.environ, **({published.ENV_FEAST_REGISTRY: str(registry)} if registry is not None else {})}
    missing = sorted({v for v in re.findall(r"\$\{(\w+)\}", settings) if v not in values})
    if missing:
        raise ValueError(f"{path} needs the environment variable(s) {', '.join(missing)}")
    repo = writable_repo(cfg)
    config = RepoConfig(**yaml.safe_load(re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)], settings)))
    config.repo_path = repo
    return FeatureStore(repo_path=str(repo), config=config)


def definitions(cfg: Config, features: str | Path) -> list[Any]:
    """The Feast objects of the repository's definitions.py, with sources at ``features``.

    The module is executed afresh (not imported from the module cache) with the variables ``feast apply``
    would see, so one process can apply several feature locations.
    """
    from feast import Entity, FeatureService, FeatureView
    from feast.data_source import DataSource

    path = repo_path(cfg) / DEFINITIONS
    spec = importlib.util.spec_from_file_location(f"unexrl_feast_definitions_{uuid.uuid4().hex}", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"no Feast definitions at {path}")
    module = importlib.util.module_from_spec(spec)
    with environ({ENV_FEATURES_URI: normalize(features), ENV_ENVIRONMENT: cfg.features.environment}):
        spec.loader.exec_module(module)
    kinds = (Entity, FeatureView, FeatureService, DataSource)
    objects: list[Any] = []
    for value in vars(module).values():
        if isinstance(value, kinds) and not any(value is o for o in objects):
            objects.append(value)
    return objects


def apply(cfg: Config, features: str | Path) -> FeatureStore:
    """Register the definitions with sources at ``features``; applying the same definitions again is a no-op."""
    store = open_store(cfg)
    store.apply(definitions(cfg, features))
    return store


def materialize(cfg: Config, features: str | Path) -> dict[str, Any]:
    """Apply the definitions with sources at ``features``, then :func:`load_online`; idempotent. A view that was
    registered over other tables, or with other features, is loaded whole again: its progress was made in other
    data, and continuing from it would skip every row of these that is older (two logs can cover the same times),
    or leave the rows it loaded without the features added since."""
    from feast import FeatureView

    store = open_store(cfg)
    objects = definitions(cfg, features)
    changed = [o.name for o in objects if isinstance(o, FeatureView) and _registered_differently(store, o)]
    store.apply(objects)
    return load_online(store, features, reload=changed)


def publish_registry(cfg: Config, target: Path) -> Path:
    """Publish the store's registry file at ``target`` for the serving replicas (the ``serving`` environment;
    unexrl/features/published.py). A run applies and materialises with a registry of its own, so runs never race
    on one; serving reads the last one published, which holds every view's definition and materialised interval
    (the item cache reloads when it moves). Only a file registry is published: ``production``'s is shared."""
    store = open_store(cfg)
    path = str(store.config.registry.path)
    if "://" in path:
        raise ValueError(
            f"features.environment={cfg.features.environment}: its registry {path} is not a file to publish"
        )
    source = Path(path) if Path(path).is_absolute() else Path(store.repo_path) / path
    if not source.is_file():
        raise FileNotFoundError(f"no registry at {source}: apply and materialise before publishing it")
    return published.publish(source, Path(target))


def _registered_differently(store: FeatureStore, view: FeatureView) -> bool:
    """Whether the store's registry holds ``view`` over another table or with other features (names or types);
    False before the view is applied."""
    from feast.errors import FeatureViewNotFoundException

    try:
        registered = store.get_feature_view(view.name)
    except FeatureViewNotFoundException:
        return False

    def schema(v: FeatureView) -> list[tuple[str, Any]]:
        return [(f.name, f.dtype) for f in v.features]

    return registered.batch_source.path != view.batch_source.path or schema(registered) != schema(view)


def load_online(store: FeatureStore, features: str | Path, reload: Sequence[str] = ()) -> dict[str, Any]:
    """Load every view into the online store up to the newest feature row of ``features``.

    A view never materialised (or named in ``reload``) is loaded from the oldest feature row on; after that each
    run continues where the last stopped (``materialize_incremental``), so re-running over the same tables
    changes nothing. The end is the data's newest timestamp, not the wall clock, so logs from any date load the
    same way.
    """
    tables = verify_feature_tables(features).tables.values()
    start = min(t.min_timestamp for t in tables if t.rows and t.min_timestamp)
    end = max(t.max_timestamp for t in tables if t.rows and t.max_timestamp) + timedelta(microseconds=1)
    fresh = [
        v.name
        for v in fs.VIEWS
        if v.name in reload or store.get_feature_view(v.name).most_recent_end_time is None
    ]
    known = [v.name for v in fs.VIEWS if v.name not in fresh]
    if fresh:
        store.materialize(start_date=start, end_date=end, feature_views=fresh)
    if known:
        store.materialize_incremental(end_date=end, feature_views=known)
    return {
        "features": normalize(features),
        "start": start.isoformat(),
        "end": end.isoformat(),
        "first_materialised": fresh,
        "incremental": known,
    }


def training_entities(transitions: pa.Table, page_size: int) -> pa.Table:
    """One entity row per (logged request, shown position): the keys and timestamp Feast joins on."""
    n = transitions.num_rows
    shown = transitions["shown_item_ids"].combine_chunks().flatten()
    return pa.table(
        {
            "request_id": np.repeat(np.asarray(transitions["request_id"]), page_size),
            "position": np.tile(np.arange(page_size, dtype=np.int64), n),
            fs.USER.join_key: np.repeat(np.asarray(transitions["user_id"]), page_size),
            fs.ITEM.join_key: shown,
            fs.TIMESTAMP: pa.chunked_array(
                [transitions[fs.TIMESTAMP].combine_chunks().take(np.repeat(np.arange(n), page_size))]
            ),
        }
    )


def check_sources(store: FeatureStore, features: str | Path | None = None) -> None:
    """Every view's offline source is where the join will read it: the registry names each table by the address
    it was applied with, so a store carried to another machine without its tables (or applied over other ones)
    would join nothing, or other data. ``features``: the tables the sources must be (a pipeline task's input)."""
    for view in fs.VIEWS:
        path = store.get_feature_view(view.name).batch_source.path
        if features is not None and path != join(features, view.file):
            raise ValueError(
                f"feature view {view.name} reads {path}, not {join(features, view.file)}: the feature store was "
                f"applied over other feature tables than {normalize(features)}"
            )
        if is_local(path) and not Path(path).is_file():
            raise FileNotFoundError(
                f"feature view {view.name} reads {path}, which is not here: the feature tables the store was "
                "materialised from must be readable where the training set is built"
            )


def training_set(
    cfg: Config, logs: str | Path, out: str | Path | None = None, features: str | Path | None = None
) -> tuple[str, pa.Table]:
    """Point-in-time features for every logged request, one row per request keyed by request_id.

    User features as of the request's timestamp; item features of the page's shown items, as of the same
    timestamp, as lists in page order. A request before any row of a view gets nulls for it, never a dropped
    row. Written to ``out`` (default: training_features.parquet next to the logs' transitions). ``features``:
    the feature tables the store must read (:func:`check_sources`), verified against their manifest and built
    from these logs.
    """
    with local_directory(logs) as local:
        data = read_logs(local)
    store = open_store(cfg)
    check_sources(store, features)
    if features is not None:
        verify_feature_tables(features, data.manifest_sha256)
    k = data.config.cascade.page_size
    entities = training_entities(data.transitions, k)
    job = store.get_historical_features(
        entity_df=entities.to_pandas(),
        features=store.get_feature_service(fs.TRAINING_SERVICE),
        full_feature_names=True,
    )
    joined = job.to_arrow()
    if joined.num_rows != entities.num_rows:
        raise ValueError(
            f"the point-in-time join returned {joined.num_rows} rows for {entities.num_rows} entity rows"
        )
    joined = joined.sort_by([("request_id", "ascending"), ("position", "ascending")])
    table = assemble_training_set(joined, k)
    if table.num_rows != data.transitions.num_rows:
        raise ValueError(
            f"training set has {table.num_rows} rows for {data.transitions.num_rows} logged requests"
        )
    target = normalize(out) if out is not None else join(logs, TRAINING_SET_FILE)
    write_parquet(table, target)
    return target, table


def assemble_training_set(joined: pa.Table, page_size: int) -> pa.Table:
    """Per-position rows (sorted by request, position) -> one row per request; item columns become lists."""
    first = np.arange(0, joined.num_rows, page_size)
    columns: dict[str, pa.Array] = {}
    for name in ("request_id", fs.TIMESTAMP, fs.USER.join_key):
        columns[name] = joined[name].combine_chunks().take(first)
    columns["shown_item_ids"] = _per_page(joined[fs.ITEM.join_key], page_size)
    for view in fs.SERVICES[fs.TRAINING_SERVICE]:
        for feature in view.features:
            name = f"{view.name}__{feature.name}"
            values = joined[name].combine_chunks().cast(fs.ARROW_TYPES[feature.dtype])
            columns[name] = values.take(first) if view.entity is fs.USER else _per_page(values, page_size)
    table = pa.table(columns)
    return table.replace_schema_metadata({"feature_service": fs.TRAINING_SERVICE})


def _per_page(values: pa.Array | pa.ChunkedArray, page_size: int) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    return pa.FixedSizeListArray.from_arrays(values, page_size)
