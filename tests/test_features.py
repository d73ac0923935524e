"""Feature store: feature computation, Feast workflow (SQLite), serving client, Redis, CLI and bench.

One small log (configs/small.yaml, random behaviour weights) is simulated once; features are built once; each
store gets its own copy of feature_repo/ (its own registry and online store) under tmp.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from unexrl.config import Config
from unexrl.data import read_logs
from unexrl.features import schema as fs
from unexrl.features import store
from unexrl.features.build import (
    build_features,
    compute_feature_tables,
    feedback_us,
    read_manifest,
    verify_feature_tables,
)
from unexrl.features.published import ENV_FEAST_REGISTRY, PublishedRegistry, RegistryRefused, check_registry
from unexrl.features.redis_server import local_redis, redis_server_path
from unexrl.policies.weights import RandomPolicy
from unexrl.sim.env import Simulator
from unexrl.simulate import simulate_logs

ROOT = Path(__file__).resolve().parents[1]
SESSIONS = 200


def _with_features(cfg: Config, **update: Any) -> Config:
    return cfg.model_copy(update={"features": cfg.features.model_copy(update=update)})


def _repo_copy(dest: Path) -> Path:
    shutil.copytree(ROOT / "feature_repo", dest, ignore=shutil.ignore_patterns("data", "__pycache__"))
    return dest


@pytest.fixture(scope="module")
def cfg(small_cfg: Config) -> Config:
    return small_cfg.model_copy(
        update={"logging": small_cfg.logging.model_copy(update={"sessions": SESSIONS})}
    )


@pytest.fixture(scope="module")
def logs(cfg: Config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    sim = Simulator(cfg)
    out = tmp_path_factory.mktemp("logs") / "run"
    return simulate_logs(
        sim, RandomPolicy(cfg.cascade, seed=0), {"kind": "random"}, out, cfg.seeds.train[0], progress=False
    )


@pytest.fixture(scope="module")
def features(cfg: Config, logs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("features") / "features"
    build_features(logs, out, cfg)
    return out


@pytest.fixture(scope="module")
def tables(features: Path) -> dict[str, pa.Table]:
    return {v.name: pq.read_table(features / v.file) for v in fs.VIEWS}


class _Log:
    """Plain numpy views of the log for brute-force references."""

    def __init__(self, logs: Path) -> None:
        data = read_logs(logs)
        tr = data.transitions
        k = data.config.cascade.page_size
        self.k = k
        self.request_id = np.asarray(tr["request_id"])
        self.user = np.asarray(tr["user_id"])
        self.session = np.asarray(tr["session_id"])
        self.event_us = np.asarray(tr["event_timestamp"].cast(pa.int64()))
        self.feedback_us = feedback_us(self.event_us, np.asarray(tr["reward"]))
        self.shown = np.asarray(tr["shown_item_ids"].combine_chunks().flatten()).reshape(-1, k)
        self.viewed = np.asarray(tr["viewed"].combine_chunks().flatten()).reshape(-1, k)
        self.watch = np.asarray(tr["watch_time_s"].combine_chunks().flatten()).reshape(-1, k)
        self.category = dict(zip(data.items["item_id"].to_pylist(), data.items["category"].to_pylist()))
        self.duration = dict(zip(data.items["item_id"].to_pylist(), data.items["duration_s"].to_pylist()))


@pytest.fixture(scope="module")
def log(logs: Path) -> _Log:
    return _Log(logs)


@pytest.fixture(scope="module")
def sqlite_cfg(cfg: Config, features: Path, tmp_path_factory: pytest.TempPathFactory) -> Config:
    """A materialised embedded store (SQLite online, DuckDB offline)."""
    repo = _repo_copy(tmp_path_factory.mktemp("sqlite") / "feature_repo")
    local = _with_features(cfg, repo=str(repo))
    store.materialize(local, features)
    return local


# ---------------------------------------------------------------- feature computation (no Feast) ---------


def test_tables_match_the_contract(tables: dict[str, pa.Table], features: Path, cfg: Config) -> None:
    manifest = read_manifest(features)
    for view in fs.VIEWS:
        table = tables[view.name]
        assert table.schema.names == view.arrow_schema().names
        assert table.num_rows == manifest.tables[view.name].rows > 0
        keys = pd.DataFrame({"k": table[view.entity.join_key], "t": table[fs.TIMESTAMP]})
        assert not keys.duplicated().any(), f"{view.name}: two rows for one (entity, timestamp)"
    assert set(fs.defaults(cfg)) == set(fs.VIEWS_BY_NAME)
    for view in fs.VIEWS:
        assert list(fs.defaults(cfg)[view.name]) == [f.name for f in view.features]


def test_behaviour_uses_only_requests_strictly_before(
    tables: dict[str, pa.Table], log: _Log, cfg: Config
) -> None:
    """Each user_behaviour row equals a brute-force aggregate of the requests with feedback <= its stamp,
    and every request it includes happened strictly before the stamp."""
    t = tables[fs.USER_BEHAVIOUR.name].to_pydict()
    stamps = np.asarray(tables[fs.USER_BEHAVIOUR.name][fs.TIMESTAMP].cast(pa.int64()))
    rng = np.random.default_rng(0)
    recent = cfg.features.recent_items
    for row in rng.choice(len(stamps), 60, replace=False):
        user, stamp = t["user_id"][row], stamps[row]
        mine = np.flatnonzero((log.user == user) & (log.feedback_us <= stamp))
        assert (log.event_us[mine] < stamp).all()
        assert t["requests"][row] == len(mine)
        assert t["sessions"][row] == len(np.unique(log.session[mine]))
        ordered = mine[np.argsort(log.feedback_us[mine], kind="stable")]
        viewed = [(i, w) for r in ordered for i, v, w in zip(log.shown[r], log.viewed[r], log.watch[r]) if v]
        viewed_items = [i for i, _ in viewed]
        assert t["items_viewed"][row] == len(viewed_items)
        assert t["watch_time_s"][row] == pytest.approx(
            float((log.watch[mine] * log.viewed[mine]).sum()), rel=1e-5
        )
        assert t["recent_item_ids"][row] == viewed_items[-recent:]
        assert t["recent_category_ids"][row] == [log.category[i] for i in viewed_items[-recent:]]
        assert t["recent_watch_fractions"][row] == pytest.approx(
            [w / log.duration[i] for i, w in viewed[-recent:]], rel=1e-5
        )
        assert sum(t["category_watch_share"][row]) == pytest.approx(1.0, abs=1e-4)


def test_item_stats_count_impressions_before_their_stamp(tables: dict[str, pa.Table], log: _Log) -> None:
    t = tables[fs.ITEM_STATS.name].to_pydict()
    stamps = np.asarray(tables[fs.ITEM_STATS.name][fs.TIMESTAMP].cast(pa.int64()))
    for row in np.random.default_rng(1).choice(len(stamps), 60, replace=False):
        shown = (log.shown == t["item_id"][row]) & (log.feedback_us[:, None] <= stamps[row])
        assert t["impressions"][row] == shown.sum()
        assert t["views"][row] == (shown & log.viewed).sum()


def test_cqr_knots_fit_on_feedback_before_each_refit(
    tables: dict[str, pa.Table], log: _Log, cfg: Config
) -> None:
    t = tables[fs.CQR_KNOTS.name]
    stamps = np.asarray(t[fs.TIMESTAMP].cast(pa.int64()))
    assert stamps.max() == log.feedback_us.max()  # the last fit uses the whole log
    n_cells = len(cfg.world.user_types) * fs.n_item_groups(cfg)
    for stamp in np.unique(stamps):
        rows = t.filter(pa.array(stamps == stamp))
        assert rows.num_rows == n_cells
        before = log.feedback_us <= stamp
        units = (
            int(before.sum())
            if cfg.features.cqr_unit == "page"
            else int((log.viewed & before[:, None]).sum())
        )
        assert sum(rows["samples"].to_pylist()) == units
        for knots in rows["knots"].to_pylist():
            assert len(knots) == cfg.features.cqr_knots and knots == sorted(knots)


def test_profiles_are_valid_from_the_first_request(
    tables: dict[str, pa.Table], log: _Log, logs: Path
) -> None:
    data = read_logs(logs)
    for view, source in ((fs.USER_PROFILE, data.users), (fs.ITEM_PROFILE, data.items)):
        table = tables[view.name]
        assert table.num_rows == source.num_rows
        assert set(np.asarray(table[fs.TIMESTAMP].cast(pa.int64()))) == {log.event_us.min()}


def test_file_uris_are_accepted(cfg: Config, logs: Path, tmp_path: Path, tables: dict[str, pa.Table]) -> None:
    out = tmp_path / "via-uri"
    build_features(f"file://{logs}", f"file://{out}", cfg)
    assert pq.read_table(out / "user_behaviour.parquet").equals(tables[fs.USER_BEHAVIOUR.name])


def test_build_refuses_to_overwrite(cfg: Config, logs: Path, features: Path) -> None:
    with pytest.raises(FileExistsError):
        build_features(logs, features, cfg)


def test_compute_rejects_an_empty_log(cfg: Config, logs: Path) -> None:
    data = read_logs(logs)
    empty = dataclasses.replace(data, transitions=data.transitions.slice(0, 0))
    with pytest.raises(ValueError, match="no transitions"):
        compute_feature_tables(empty, cfg)


def test_core_imports_and_builds_without_feast(logs: Path, tmp_path: Path) -> None:
    """The core package (CLI included) imports without feast, and feature building needs none."""
    script = f"""
import sys
class _NoFeast:
    def find_spec(self, name, path=None, target=None):
        if name == "feast" or name.startswith("feast."):
            raise ImportError("feast is blocked in this test")
sys.meta_path.insert(0, _NoFeast())
import unexrl, unexrl.cli, unexrl.commands, unexrl.features.store, unexrl.features.client, unexrl.features.bench
from unexrl.config import load_config
from unexrl.features.build import build_features
build_features({str(logs)!r}, {str(tmp_path / "out")!r}, load_config(None, []))
assert not any(m == "feast" or m.startswith("feast.") for m in sys.modules)
print("ok")
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("ok")


# ---------------------------------------------------------------- Feast definitions and environments -----


def test_definitions_are_the_same_in_every_environment(cfg: Config, features: Path) -> None:
    from feast import FeatureView, FileSource
    from feast.infra.offline_stores.contrib.spark_offline_store.spark_source import SparkSource

    def views(env: str) -> dict[str, FeatureView]:
        objects = store.definitions(_with_features(cfg, environment=env), features)
        return {o.name: o for o in objects if isinstance(o, FeatureView)}

    local, production = views("local"), views("production")
    assert set(local) == set(production) == set(fs.VIEWS_BY_NAME)
    for name, view in local.items():
        assert [f.name for f in view.features] == [f.name for f in fs.VIEWS_BY_NAME[name].features]
        assert view.features == production[name].features and view.entities == production[name].entities
        assert isinstance(view.batch_source, FileSource)
        assert isinstance(production[name].batch_source, SparkSource)
        assert production[name].batch_source.path == view.batch_source.path == f"{features}/{name}.parquet"


def test_environment_files(cfg: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = ROOT / "feature_repo"
    ignored = (repo / ".feastignore").read_text().split()
    assert "environments/" in ignored and "data/" in ignored
    local = yaml.safe_load((repo / "feature_store.yaml").read_text())
    assert local["online_store"]["type"] == "sqlite" and local["offline_store"]["type"] == "duckdb"
    redis = yaml.safe_load((repo / "environments" / "redis.yaml").read_text())
    assert redis["online_store"]["type"] == "redis" and redis["offline_store"]["type"] == "duckdb"
    serving = yaml.safe_load((repo / "environments" / "serving.yaml").read_text())
    assert serving["registry"]["path"] == "${UNEXRL_FEAST_REGISTRY}"  # what the pipeline publishes
    # it reads the rows the pipeline's redis environment writes: the same project, store and key encoding
    for key in ("project", "online_store", "entity_key_serialization_version"):
        assert serving[key] == redis[key], key
    production = yaml.safe_load((repo / "environments" / "production.yaml").read_text())
    assert production["online_store"]["type"] == "redis"
    assert (
        production["offline_store"]["type"] == "spark"
        and production["batch_engine"]["type"] == "spark.engine"
    )
    monkeypatch.delenv("UNEXRL_REDIS", raising=False)
    with pytest.raises(ValueError, match="UNEXRL_REDIS"):
        store.open_store(_with_features(cfg, environment="redis"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        store.store_yaml(_with_features(cfg, environment="nowhere"))


# ---------------------------------------------------------------- Feast workflow on the embedded store ----


def _sqlite_dump(cfg: Config) -> list[str]:
    import sqlite3

    with sqlite3.connect(store.repo_path(cfg) / "data" / "online_store.db") as conn:
        return list(conn.iterdump())


def test_materialising_twice_changes_nothing(sqlite_cfg: Config, features: Path) -> None:
    before = _sqlite_dump(sqlite_cfg)
    assert len(before) > 1000
    again = store.materialize(sqlite_cfg, features)
    assert again["first_materialised"] == [] and set(again["incremental"]) == set(fs.VIEWS_BY_NAME)
    assert _sqlite_dump(sqlite_cfg) == before


def test_tables_from_elsewhere_are_materialised_whole(cfg: Config, features: Path, tmp_path: Path) -> None:
    """The store's progress belongs to the tables it was made in: other tables (another log, which may cover the
    same times) are loaded from their oldest row, not from where the last ones stopped."""
    local = _with_features(cfg, repo=str(_repo_copy(tmp_path / "feature_repo")))
    store.materialize(local, features)
    elsewhere = tmp_path / "features"
    shutil.copytree(features, elsewhere)
    moved = store.materialize(local, elsewhere)
    assert set(moved["first_materialised"]) == set(fs.VIEWS_BY_NAME) and moved["incremental"] == []
    assert store.materialize(local, elsewhere)["first_materialised"] == []


def test_a_view_registered_with_other_features_is_materialised_whole(
    cfg: Config, features: Path, tmp_path: Path
) -> None:
    """Rows loaded before a view gained a feature do not hold it: the view is loaded whole again, not continued
    from where those rows stopped (which would leave every user without new feedback on the old row)."""
    from feast import Entity, FeatureView

    local = _with_features(cfg, repo=str(_repo_copy(tmp_path / "feature_repo")))
    objects = store.definitions(local, features)
    old = next(o for o in objects if isinstance(o, FeatureView) and o.name == fs.USER_BEHAVIOUR.name)
    old.features = [f for f in old.features if f.name != "recent_watch_fractions"]
    feast_store = store.open_store(local)
    feast_store.apply([*(o for o in objects if isinstance(o, Entity)), old])
    behaviour = pq.read_table(features / fs.USER_BEHAVIOUR.file).to_pandas()
    end = behaviour[fs.TIMESTAMP].max() + timedelta(microseconds=1)
    feast_store.materialize(behaviour[fs.TIMESTAMP].min(), end, feature_views=[old.name])

    loaded = store.materialize(local, features)
    assert fs.USER_BEHAVIOUR.name in loaded["first_materialised"]
    latest = behaviour.sort_values(fs.TIMESTAMP).groupby("user_id").last()
    users = [int(u) for u in latest.index[latest["items_viewed"] > 0][:5]]
    assert users
    online = _online(local, fs.USER_BEHAVIOUR, users)["recent_watch_fractions"]
    assert online == [pytest.approx(list(latest.loc[u, "recent_watch_fractions"])) for u in users]


def _online(cfg: Config, view: fs.ViewSpec, ids: list[int]) -> dict[str, list[Any]]:
    feast_store = store.open_store(cfg)
    refs = [f"{view.name}:{f.name}" for f in view.features]
    return feast_store.get_online_features(
        features=refs, entity_rows=[{view.entity.join_key: i} for i in ids]
    ).to_dict()


def _offline(cfg: Config, view: fs.ViewSpec, ids: list[int], at: pd.Timestamp) -> pa.Table:
    feast_store = store.open_store(cfg)
    entities = pd.DataFrame({view.entity.join_key: ids, fs.TIMESTAMP: [at] * len(ids)})
    refs = [f"{view.name}:{f.name}" for f in view.features]
    joined = feast_store.get_historical_features(entity_df=entities, features=refs).to_arrow()
    return joined.sort_by(view.entity.join_key)


def test_online_values_equal_offline_values_at_the_same_time(
    sqlite_cfg: Config, features: Path, tables: dict[str, pa.Table]
) -> None:
    """After materialising up to the newest row, the online store holds what a point-in-time read at that
    time returns offline, for every entity of every view (pushed session rows only while within their ttl)."""
    end = max(pd.Timestamp(t.max_timestamp) for t in read_manifest(features).tables.values())
    at = end + timedelta(microseconds=1)
    for view in fs.VIEWS:
        ids = sorted(set(tables[view.name][view.entity.join_key].to_pylist()))
        online = _online(sqlite_cfg, view, ids)
        offline = _offline(sqlite_cfg, view, ids, at)
        assert offline[view.entity.join_key].to_pylist() == ids
        for feature in view.features:
            got, want = online[feature.name], offline[feature.name].to_pylist()
            if view.ttl_s:
                live = [w is not None for w in want]
                assert 0 < sum(live) < len(ids)  # some sessions expired, some did not
                got = [g for g, keep in zip(got, live) if keep]
                want = [w for w in want if w is not None]
            assert got == want, f"{view.name}.{feature.name}"


def test_training_set_is_point_in_time_correct(
    sqlite_cfg: Config, logs: Path, log: _Log, tmp_path: Path
) -> None:
    target, table = store.training_set(sqlite_cfg, logs, tmp_path / "ts.parquet")
    assert pq.read_table(target).equals(table)
    assert table.num_rows == len(log.request_id)  # one row per logged request
    assert table["request_id"].to_pylist() == sorted(log.request_id.tolist())
    order = np.argsort(log.request_id)
    requests = table["user_behaviour__requests"].to_pylist()
    impressions = table["item_stats__impressions"].to_pylist()
    for row, r in enumerate(order):
        before = (log.user == log.user[r]) & (log.feedback_us <= log.event_us[r])
        assert requests[row] == (before.sum() or None), "a behaviour row from after the request was joined"
        for pos, item in enumerate(log.shown[r]):
            n = int(((log.shown == item) & (log.feedback_us[:, None] <= log.event_us[r])).sum())
            assert impressions[row][pos] == (n or None)
    assert table["user_behaviour__requests"].null_count > 0  # first requests: nulls, not dropped rows
    assert table["user_profile__activity_group"].null_count == 0
    assert table["item_profile__category"].combine_chunks().flatten().null_count == 0


def test_the_join_refuses_a_store_whose_tables_are_elsewhere(
    sqlite_cfg: Config, features: Path, logs: Path, tmp_path: Path
) -> None:
    """The registry names each view's table by the path it was applied with: a training set built against other
    tables, or where those are not, is refused by name instead of joining other data or none."""
    elsewhere = tmp_path / "features"
    with pytest.raises(
        ValueError, match=r"feature view user_profile reads .* not .*applied over other feature"
    ):
        store.training_set(sqlite_cfg, logs, tmp_path / "ts.parquet", features=elsewhere)
    moved = features.with_name("moved")
    features.rename(moved)
    try:
        with pytest.raises(FileNotFoundError, match=r"feature view user_profile reads .*which is not here"):
            store.training_set(sqlite_cfg, logs, tmp_path / "ts.parquet", features=features)
    finally:
        moved.rename(features)
    assert not (tmp_path / "ts.parquet").exists()


def test_feature_tables_changed_after_the_build_are_refused(
    cfg: Config, logs: Path, features: Path, tmp_path: Path
) -> None:
    """Feast reads the Parquet files directly: materialising or joining first checks each against its manifest,
    and a join checks the tables were built from the logs it joins them to."""
    copy = tmp_path / "features"
    shutil.copytree(features, copy)
    table = copy / fs.USER_BEHAVIOUR.file
    pq.write_table(pq.read_table(table).slice(0, 1), table)  # cut short, as a bad copy would be
    with pytest.raises(
        ValueError, match=r"user_behaviour\.parquet: sha256 .* refusing feature tables changed"
    ):
        verify_feature_tables(copy)
    manifest = read_manifest(features)
    assert verify_feature_tables(features, manifest.logs_manifest_sha256) == manifest
    with pytest.raises(ValueError, match="feature tables built from the logs .* not from these"):
        verify_feature_tables(features, "0" * 64)


def test_a_row_is_joined_from_its_timestamp_on_and_never_before(
    sqlite_cfg: Config, tables: dict[str, pa.Table]
) -> None:
    behaviour = tables[fs.USER_BEHAVIOUR.name]
    users = np.asarray(behaviour["user_id"])
    second = int(np.flatnonzero(users[1:] == users[:-1])[0] + 1)  # a user's second row
    user, stamp = int(users[second]), behaviour[fs.TIMESTAMP][second].as_py()
    first_stamp = behaviour[fs.TIMESTAMP][second - 1].as_py()
    entities = pd.DataFrame(
        {
            "user_id": [user] * 4,
            fs.TIMESTAMP: [
                first_stamp - timedelta(microseconds=1),
                stamp - timedelta(microseconds=1),
                stamp,
                stamp + timedelta(hours=1),
            ],
            "label": [0, 1, 2, 3],
        }
    )
    joined = (
        store.open_store(sqlite_cfg)
        .get_historical_features(entity_df=entities, features=["user_behaviour:requests"])
        .to_df()
        .sort_values("label")
    )
    assert len(joined) == 4  # a request before any feature keeps its row, with a null
    values = joined["requests"].tolist()
    want = behaviour["requests"].to_pylist()
    stamps = behaviour[fs.TIMESTAMP].to_pylist()
    later = max(i for i in range(len(users)) if users[i] == user and stamps[i] <= stamp + timedelta(hours=1))
    assert pd.isna(values[0]) and values[1:] == [want[second - 1], want[second], want[later]]


# ---------------------------------------------------------------- serving client --------------------------


def _fallbacks(reason: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("unexrl_feature_store_fallbacks_total", {"reason": reason}) or 0.0


def test_client_reads_user_and_candidates(sqlite_cfg: Config, tables: dict[str, pa.Table]) -> None:
    from unexrl.features.client import FeatureClient

    behaviour = tables[fs.USER_BEHAVIOUR.name].to_pandas().groupby("user_id").last()
    user = int(behaviour.index[0])
    items = tables[fs.ITEM_STATS.name].to_pandas().groupby("item_id").last()
    candidates = [int(i) for i in items.index[:50]]
    got = FeatureClient(sqlite_cfg).fetch(user, candidates)
    assert not got.degraded and got.cold_start["user_behaviour"] == 0 and got.cold_start["item_stats"] == 0
    assert got.user["user_behaviour__requests"] == behaviour.loc[user, "requests"]
    assert got.user["user_behaviour__recent_item_ids"] == list(behaviour.loc[user, "recent_item_ids"])
    assert got.items["item_stats__views"] == items.loc[candidates, "views"].tolist()
    assert len(got.items["item_profile__category"]) == 50


def test_client_cold_start_serves_documented_defaults(
    sqlite_cfg: Config, tables: dict[str, pa.Table]
) -> None:
    from unexrl.features.client import FeatureClient

    defaults = fs.defaults(sqlite_cfg)
    known = int(tables[fs.ITEM_STATS.name]["item_id"][0].as_py())
    never = 10**9
    before = _fallbacks("cold_start")
    got = FeatureClient(sqlite_cfg).fetch(never, [never, known])
    assert not got.degraded
    for view in fs.SERVICES[fs.USER_SERVING_SERVICE]:
        for f in view.features:
            assert got.user[f"{view.name}__{f.name}"] == defaults[view.name][f.name]
    assert got.items["item_stats__views"][0] == defaults["item_stats"]["views"]
    assert got.items["item_stats__views"][1] > 0
    assert got.cold_start == {
        "user_profile": 1,
        "user_behaviour": 1,
        "user_session": 1,
        "item_profile": 1,
        "item_stats": 1,
    }
    assert _fallbacks("cold_start") - before == 2  # the unknown user and the unknown item
    got.user["user_behaviour__recent_item_ids"].append(1)  # defaults are copies
    assert fs.defaults(sqlite_cfg)["user_behaviour"]["recent_item_ids"] == []
    assert FeatureClient(sqlite_cfg).fetch(never, [])


def test_client_degrades_when_the_store_is_missing(cfg: Config, tmp_path: Path) -> None:
    from unexrl.features.client import FeatureClient

    before = _fallbacks("unreachable")
    client = FeatureClient(_with_features(cfg, repo=str(tmp_path / "no-repo")))
    client.warm_up()  # serves no one: no fallback counted
    assert _fallbacks("unreachable") == before
    got = client.fetch(1, [1, 2, 3])
    assert got.degraded and got.user["user_profile__activity_group"] == -1
    assert got.items["item_stats__quality_estimate"] == [0.5] * 3
    assert _fallbacks("unreachable") - before == 1 + 3  # the user and the three candidates


def test_a_new_session_reads_no_session_row(sqlite_cfg: Config, tables: dict[str, pa.Table]) -> None:
    """A request that starts a session does not read user_session: its defaults are the definition, not a
    cold-start fallback."""
    from unexrl.features.client import FeatureClient

    user = int(tables[fs.USER_BEHAVIOUR.name]["user_id"][0].as_py())
    before = _fallbacks("cold_start")
    got = FeatureClient(sqlite_cfg).fetch(user, [], session=False)
    assert "user_session" not in got.cold_start and _fallbacks("cold_start") == before
    defaults = fs.defaults(sqlite_cfg)[fs.USER_SESSION.name]
    assert all(got.user[f"user_session__{name}"] == value for name, value in defaults.items())


def test_item_cache_reloads_when_a_new_materialisation_is_published(
    cfg: Config, features: Path, tables: dict[str, pa.Table], tmp_path: Path
) -> None:
    """Candidates come from the process-local copy: equal to Feast's online rows, whole and unchanged until the
    registry shows a new materialisation, then reloaded at once."""
    from unexrl.features.client import FeatureClient

    local = _with_features(cfg, repo=str(_repo_copy(tmp_path / "feature_repo")), item_cache_check_s=3600.0)
    feast = store.apply(local, features)
    stamps = tables[fs.ITEM_STATS.name][fs.TIMESTAMP]
    first, middle = (
        stamps.combine_chunks().sort()[0].as_py(),
        stamps.combine_chunks().sort()[len(stamps) // 2].as_py(),
    )
    feast.materialize(start_date=first, end_date=middle, feature_views=[v.name for v in fs.VIEWS])
    client = FeatureClient(local)
    items = list(range(40))
    early = client.fetch(0, items).items
    cold = fs.defaults(local)[fs.ITEM_STATS.name]["views"]
    online = lambda: [cold if v is None else v for v in _online(local, fs.ITEM_STATS, items)["views"]]
    assert early["item_stats__views"] == online()
    store.load_online(feast, features)  # a new materialisation, up to the newest row
    latest = online()
    assert latest != early["item_stats__views"]
    assert client.fetch(0, items).items == early  # not checked yet: the previous copy, whole
    client.refresh_items()
    assert client.fetch(0, items).items["item_stats__views"] == latest


def test_pushed_session_features_are_served(sqlite_cfg: Config, tables: dict[str, pa.Table]) -> None:
    from unexrl.features.client import FeatureClient

    client = FeatureClient(sqlite_cfg)
    user = int(tables[fs.USER_SESSION.name]["user_id"][0].as_py())
    at = pd.Timestamp("2030-01-01T00:00:00Z")
    assert client.push_session(
        user, at, session_id=777, step=3, items_watched=9, watch_time_s=123.5, last_watch_fraction=0.25
    )
    got = client.fetch(user, [])
    assert got.user["user_session__session_id"] == 777 and got.user["user_session__session_step"] == 3
    assert got.user["user_session__session_watch_time_s"] == 123.5


def test_a_push_writes_the_one_view_its_source_feeds(sqlite_cfg: Config, features: Path) -> None:
    """`FeatureClient.push` writes a pushed view directly (a Feast push rebuilt every view and service from the
    registry per call): what a push to the view's source does online as long as each push source feeds its own
    view only and no feature service precomputes online vectors, which this checks of the definitions."""
    from feast import FeatureService, FeatureView

    objects = store.definitions(sqlite_cfg, features)
    fed = {
        o.stream_source.name: o.name
        for o in objects
        if isinstance(o, FeatureView) and o.stream_source is not None
    }
    pushed = [v for v in fs.VIEWS if v.pushed]
    assert fed == {v.push_source: v.name for v in pushed}
    assert [v.name for v in pushed] == [fs.USER_BEHAVIOUR.name, fs.USER_SESSION.name]
    assert not any(o.precompute_online for o in objects if isinstance(o, FeatureService))


def test_a_push_of_another_view_or_row_is_refused(sqlite_cfg: Config) -> None:
    """A push names its view's features exactly, of a pushed user view: anything else is a caller's error, not a
    row written with nulls."""
    from unexrl.features.client import FeatureClient

    client, at = FeatureClient(sqlite_cfg), pd.Timestamp("2030-01-01T00:00:00Z")
    with pytest.raises(ValueError, match="not a user view fed by a push source"):
        client.push(fs.ITEM_STATS, 1, at, {})
    with pytest.raises(ValueError, match="has the features"):
        client.push(fs.USER_SESSION, 1, at, {"session_id": 1})


# ---------------------------------------------------------------- Redis ------------------------------------


def test_redis_store_serves_what_sqlite_serves(
    redis_address: str,
    cfg: Config,
    features: Path,
    sqlite_cfg: Config,
    tables: dict[str, pa.Table],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from unexrl.features.client import FeatureClient

    monkeypatch.setenv("UNEXRL_REDIS", redis_address)
    redis_cfg = _with_features(cfg, repo=str(_repo_copy(tmp_path / "feature_repo")), environment="redis")
    first = store.materialize(redis_cfg, features)
    assert set(first["first_materialised"]) == set(fs.VIEWS_BY_NAME)
    again = store.materialize(redis_cfg, features)
    assert again["first_materialised"] == []
    for view in (fs.USER_BEHAVIOUR, fs.ITEM_STATS, fs.CQR_KNOTS, fs.ITEM_PROFILE):
        ids = sorted(set(tables[view.name][view.entity.join_key].to_pylist()))
        assert _online(redis_cfg, view, ids) == _online(sqlite_cfg, view, ids), view.name

    client = FeatureClient(redis_cfg)
    user = int(tables[fs.USER_BEHAVIOUR.name]["user_id"][0].as_py())
    candidates = list(range(30))
    from_redis, from_sqlite = (
        client.fetch(user, candidates),
        FeatureClient(sqlite_cfg).fetch(user, candidates),
    )
    assert not from_redis.degraded and from_redis.items == from_sqlite.items
    assert from_redis.user["user_behaviour__requests"] == from_sqlite.user["user_behaviour__requests"]
    assert client.push_session(user, pd.Timestamp("2030-01-01T00:00:00Z"), 5, 1, 2, 3.0, 0.75)
    assert client.fetch(user, []).user["user_session__last_watch_fraction"] == 0.75


def test_serving_reads_redis_through_the_published_registry(
    cfg: Config,
    features: Path,
    tables: dict[str, pa.Table],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A serving replica opens the `serving` environment over its own copy of the definitions. Started before any
    run published, it serves defaults and recovers with the first publication, without a restart. It then reads
    what the run materialised into Redis, through a checked private copy of the registry the run published: it
    writes neither that registry nor its copy of the repository (both read-only in a pod), its item cache follows
    the next run's publication, and a publication it refuses leaves it on its last good copy. A replica whose
    requests read no items (the serving engine's: ``fetch(user, [])``), so that no item cache looks at the
    registry, follows the publications too."""
    from unexrl.features.client import FeatureClient

    if redis_server_path() is None:
        pytest.skip("redis-server is not installed here and could not be installed (make test installs it)")
    run = _with_features(cfg, repo=str(_repo_copy(tmp_path / "run")), environment="redis")
    target = tmp_path / "feast" / "registry.db"
    monkeypatch.setenv(ENV_FEAST_REGISTRY, str(target))
    replica_repo = _repo_copy(tmp_path / "replica")
    replica = FeatureClient(
        _with_features(cfg, repo=str(replica_repo), environment="serving", item_cache_check_s=3600.0)
    )
    follower = FeatureClient(
        _with_features(
            cfg, repo=str(_repo_copy(tmp_path / "follower")), environment="serving", item_cache_check_s=0.0
        )
    )

    def follows(registry: bytes) -> bool:
        """A request without items, then: does the follower's Feast read ``registry``?"""
        got = follower.fetch(user, [])
        assert follower._published is not None and follower._items is None
        return not got.degraded and follower._published.copy.read_bytes() == registry

    user, items = int(tables[fs.USER_BEHAVIOUR.name]["user_id"][0].as_py()), list(range(40))
    with local_redis() as address:  # its own: newer rows another test left would hide this one's second run
        monkeypatch.setenv("UNEXRL_REDIS", address)
        assert replica.fetch(user, items).degraded  # nothing published yet
        with pytest.raises(FileNotFoundError, match="apply and materialise"):
            store.publish_registry(run, target)  # nothing applied yet
        feast = store.apply(run, features)
        stamps = tables[fs.ITEM_STATS.name][fs.TIMESTAMP].combine_chunks().sort()
        first, middle = stamps[0].as_py(), stamps[len(stamps) // 2].as_py()
        feast.materialize(start_date=first, end_date=middle, feature_views=[v.name for v in fs.VIEWS])
        published = store.publish_registry(run, target)
        untouched = {p: p.stat().st_mtime_ns for p in [*replica_repo.rglob("*"), published]}
        got, want = replica.fetch(user, items), FeatureClient(run).fetch(user, items)
        assert not got.degraded and got.user == want.user and got.items == want.items
        assert published.stat().st_mtime_ns == untouched.pop(published)
        assert follows(published.read_bytes())
        store.load_online(feast, features)  # the next run: a new materialisation, published
        store.publish_registry(run, published)
        replica.refresh_items()
        latest = FeatureClient(run).fetch(user, items).items
        assert replica.fetch(user, items).items == latest != got.items
        good = published.read_bytes()
        assert follows(good)
        published.write_bytes(_with_on_demand_view(good))  # whoever can write the volume
        replica.refresh_items()
        assert replica._published is not None and replica._published.copy.read_bytes() == good
        assert not replica.fetch(user, items).degraded and replica.fetch(user, items).items == latest
        assert follows(good)
    assert {p: p.stat().st_mtime_ns for p in replica_repo.rglob("*")} == untouched


def _with_on_demand_view(registry: bytes) -> bytes:
    """``registry`` with an on-demand feature view added: a view whose transformation Feast would rebuild and
    run."""
    from feast.protos.feast.core.Registry_pb2 import Registry

    proto = Registry()
    proto.ParseFromString(registry)
    proto.on_demand_feature_views.add().spec.name = "anything"
    return proto.SerializeToString()


def test_a_published_registry_is_checked_before_it_is_used(
    cfg: Config, features: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a serving replica refuses to copy from the volume: bytes that are no registry, anything the
    definitions never make (kinds of view, transformations that carry code, also inside a view's version history,
    other kinds and classes of source, also nested in a push source, another project), and, where the environment
    trusts keys, a registry its pipeline did not sign, or a signature of another kind of file; and a registry
    older than the one the replica uses."""
    from feast.protos.feast.core.FeatureView_pb2 import FeatureView
    from feast.protos.feast.core.Registry_pb2 import Registry

    from unexrl.contracts.signing import (
        ENV_PUBLIC_KEYS,
        ENV_SIGNING_KEY,
        SignatureError,
        generate_keys,
        sign_file,
    )
    from unexrl.features import published

    run = _with_features(cfg, repo=str(_repo_copy(tmp_path / "run")))
    store.apply(run, features)
    good = (tmp_path / "run" / "data" / "registry.db").read_bytes()
    check_registry(good, "unexrl", "good")

    def proto_of(data: bytes) -> Registry:
        proto = Registry()
        proto.ParseFromString(data)
        return proto

    def spoiled(change: Callable[[Registry], object]) -> bytes:
        proto = proto_of(good)
        change(proto)
        return proto.SerializeToString()

    def transforming(record: Any) -> None:
        view = FeatureView()
        view.ParseFromString(record.feature_view_proto)
        view.spec.feature_transformation.user_defined_function.body_text = "import os"
        record.feature_view_proto = view.SerializeToString()

    pushed = next(
        i for i, source in enumerate(proto_of(good).data_sources) if source.HasField("batch_source")
    )
    cases = {
        "not a Feast Registry": b"\xff\xfe not a registry",
        r"\.on_demand_feature_views: set, and the definitions never": spoiled(
            lambda r: r.on_demand_feature_views.add()
        ),
        r"feature_views\[0\]\.spec\.feature_transformation: set": spoiled(
            lambda r: r.feature_views[0].spec.feature_transformation.user_defined_function.SetInParent()
        ),
        r"records\[0\]\.feature_view_proto\.spec\.feature_transformation": spoiled(
            lambda r: transforming(r.feature_view_version_history.records[0])
        ),
        rf"data_sources\[{pushed}\]\.batch_source\.data_source_class_type: 'os.system'": spoiled(
            lambda r: setattr(r.data_sources[pushed].batch_source, "data_source_class_type", "os.system")
        ),
        r"data_sources\[0\]\.type: 'STREAM_KAFKA'": spoiled(lambda r: setattr(r.data_sources[0], "type", 3)),
        r"data_sources\[0\]\.type: 999,": spoiled(lambda r: setattr(r.data_sources[0], "type", 999)),
        r"entities\[0\]\.spec\.project: of the project 'other'": spoiled(
            lambda r: setattr(r.entities[0].spec, "project", "other")
        ),
        # a field this Feast does not know: parsed aside, unseen by the walk, copied with the rest
        r"registry: fields numbered \[999\]": good + b"\xba\x3e\x0aimport os\x0a",
    }
    for problem, data in cases.items():
        with pytest.raises(RegistryRefused, match=problem):
            check_registry(data, "unexrl", "spoiled")
    private, public = generate_keys(tmp_path / "keys")
    target = tmp_path / "feast" / "registry.db"
    store.publish_registry(run, target)  # no signing key: unsigned
    trusting = {ENV_PUBLIC_KEYS: str(public)}
    with pytest.raises(SignatureError, match="no registry.db.sig"):
        PublishedRegistry(target, "unexrl", trusting).sync()
    monkeypatch.setenv(ENV_SIGNING_KEY, str(private))
    sign_file(target, published.signature_of(target))  # a valid signature, but not of a registry
    with pytest.raises(SignatureError, match="does not verify"):
        PublishedRegistry(target, "unexrl", trusting).sync()

    other = tmp_path / "other.db"
    other.write_bytes(spoiled(lambda r: setattr(r.feature_views[0].spec, "description", "another run")))
    races = [other]

    def raced(path: Path, signature: Path, *args: Any) -> bool:
        """Sign, then, once, let another run's signature land before this run's rename."""
        signed = sign_file(path, signature, *args)
        for run_beside in races:
            sign_file(run_beside, signature, os.environ, published.SIGNATURE_PURPOSE)
        races.clear()
        return signed

    monkeypatch.setattr(published, "sign_file", raced)
    store.publish_registry(run, target)
    replica = PublishedRegistry(target, "unexrl", trusting)
    assert replica.sync() and replica.copy.read_bytes() == good and not replica.sync()
    older = tmp_path / "older.db"
    older.write_bytes(spoiled(lambda r: setattr(r.last_updated, "seconds", r.last_updated.seconds - 3600)))
    published.publish(older, target)  # an older registry the pipeline signed, copied back onto the volume
    with pytest.raises(RegistryRefused, match=r"last updated .* before the registry in use"):
        replica.sync()
    assert replica.copy.read_bytes() == good
    assert PublishedRegistry(target, "unexrl", trusting).sync()  # a replica that starts takes it: not stopped
    store.publish_registry(run, target)  # as recent as the copy in use: taken
    assert replica.sync() and replica.copy.read_bytes() == good
    monkeypatch.delenv(ENV_SIGNING_KEY)
    store.publish_registry(run, target)  # unsigned again: the last signature goes with it
    assert not published.signature_of(target).exists()


def test_a_published_file_that_could_block_or_flood_a_replica_is_refused_unread(
    cfg: Config, features: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica opens the published registry and its signature as regular files of a bounded size only: a pipe
    (which would block it), a link or a file too large is refused, not read, and a refused publication is not
    read again until it or its signature changes."""
    import threading

    from unexrl.contracts.signing import ENV_PUBLIC_KEYS, SignatureError, generate_keys
    from unexrl.features import published

    run = _with_features(cfg, repo=str(_repo_copy(tmp_path / "run")))
    store.apply(run, features)
    good = tmp_path / "run" / "data" / "registry.db"
    target = tmp_path / "feast" / "registry.db"
    target.parent.mkdir()

    def refusal(environ: dict[str, str] | None = None) -> BaseException | None:
        """What a fresh replica's first sync raises, within seconds (a replica blocked on the file is a failure)."""
        raised: list[BaseException | None] = []

        def sync() -> None:
            try:
                PublishedRegistry(target, "unexrl", environ or {}).sync()
                raised.append(None)
            except Exception as err:  # noqa: BLE001 - returned to the test
                raised.append(err)

        reader = threading.Thread(target=sync, daemon=True)
        reader.start()
        reader.join(10)
        assert not reader.is_alive(), "the replica blocked reading the published file"
        return raised[0]

    os.mkfifo(target)
    assert isinstance(refusal(), RegistryRefused) and "not a regular file" in str(refusal())
    target.unlink()
    target.symlink_to(good)
    assert "a symbolic link" in str(refusal())
    target.unlink()
    shutil.copy(good, target)
    assert refusal() is None
    monkeypatch.setattr(published, "REGISTRY_MAX_BYTES", good.stat().st_size - 1)
    assert "larger than" in str(refusal())
    monkeypatch.undo()

    _, public = generate_keys(tmp_path / "keys")
    signature = published.signature_of(target)
    os.mkfifo(signature)
    err = refusal({ENV_PUBLIC_KEYS: str(public)})
    assert isinstance(err, SignatureError) and "registry.db.sig unreadable" in str(err)
    signature.unlink()

    reads: list[Path] = []
    read = published.read_regular_file

    def counted(path: Path, limit: int) -> tuple[bytes, os.stat_result]:
        reads.append(path)
        return read(path, limit)

    monkeypatch.setattr(published, "read_regular_file", counted)
    target.write_bytes(_with_on_demand_view(good.read_bytes()))
    replica = PublishedRegistry(target, "unexrl")
    for _ in range(3):
        with pytest.raises(RegistryRefused, match="on_demand_feature_views"):
            replica.sync()
    assert reads == [target]  # read once, then refused by its stamp
    shutil.copy(good, tmp_path / "next.db")
    (tmp_path / "next.db").replace(target)  # the next publication
    assert replica.sync() and replica.copy.read_bytes() == good.read_bytes() and len(reads) == 2


def test_redis_down_degrades_without_raising(
    cfg: Config, features: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from unexrl.features.client import FeatureClient

    if redis_server_path() is None:
        pytest.skip("redis-server is not installed here and could not be installed (make test installs it)")
    redis_cfg = _with_features(cfg, repo=str(_repo_copy(tmp_path / "feature_repo")), environment="redis")
    with local_redis() as address:
        monkeypatch.setenv("UNEXRL_REDIS", address)
        store.materialize(redis_cfg, features)
        client = FeatureClient(redis_cfg)
        assert not client.fetch(0, [1, 2]).degraded
        categories = _online(redis_cfg, fs.ITEM_PROFILE, [1, 2])["category"]
    before = _fallbacks("unreachable")
    got = client.fetch(0, [1, 2])  # the server is gone: the user from defaults, the candidates from the cache
    assert got.degraded and got.user["user_profile__activity_group"] == -1
    assert got.items["item_profile__category"] == categories
    assert _fallbacks("unreachable") - before == 1  # the user only
    assert not client.push_session(0, pd.Timestamp("2030-01-01T00:00:00Z"), 1, 1, 1, 1.0, 0.5)


# ---------------------------------------------------------------- CLI and bench -----------------------------


def test_cli_workflow_and_bench(logs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from unexrl.cli import main

    repo = _repo_copy(tmp_path / "feature_repo")
    common = ["--config", str(ROOT / "configs" / "small.yaml"), "--set", f"features.repo={repo}"]
    features = tmp_path / "features"
    assert (
        main(["features", "training-set", *common, "--logs", str(logs), "--out", str(tmp_path / "x.parquet")])
        == 2
    )
    assert "materialize" in capsys.readouterr().err
    assert main(["features", "build", *common, "--logs", str(logs), "--out", str(features)]) == 0
    assert main(["features", "materialize", *common, "--features", str(features)]) == 0
    assert main(["features", "materialize", *common, "--features", str(features)]) == 0
    logs_copy = tmp_path / "logs"
    shutil.copytree(logs, logs_copy)
    assert main(["features", "training-set", *common, "--logs", str(logs_copy)]) == 0
    table = pq.read_table(logs_copy / store.TRAINING_SET_FILE)
    assert table.num_rows == read_logs(logs_copy).transitions.num_rows
    capsys.readouterr()

    bench_json = tmp_path / "bench.json"
    assert (
        main(
            [
                "bench",
                "features",
                *common,
                "--logs",
                str(logs),
                "--json",
                str(bench_json),
                "--set",
                "features.bench_reads=10",
                "--set",
                "features.bench_candidates=50",
            ]
        )
        == 0
    )
    result = json.loads(bench_json.read_text())
    expected = {"sqlite", "redis"} if redis_server_path() else {"sqlite"}
    measured = {name for name, r in result["stores"].items() if "skipped" not in r}
    assert measured == expected
    for name in measured:
        r = result["stores"][name]
        assert r["materialise_rows_per_s"] > 0 and r["reads"] == 10
        assert 0 < r["online_read_ms"]["p50"] <= r["online_read_ms"]["p99"]


def test_docs_name_every_view_feature_and_service() -> None:
    text = (ROOT / "docs" / "features.md").read_text()
    for view in fs.VIEWS:
        assert f"`{view.name}`" in text, view.name
        for feature in view.features:
            assert f"`{feature.name}`" in text, f"{view.name}.{feature.name}"
    for service in fs.SERVICES:
        assert f"`{service}`" in text, service
