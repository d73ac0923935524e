"""`unexrl bench features`: materialisation throughput and online read latency, SQLite and Redis, one run.

Each store gets a fresh copy of the Feast repository (its own registry and online store) over the same
feature tables, so both load exactly the same rows. Rows/s counts the rows written to the online store
(one per entity and view: the newest row of each) over the wall time of the materialisation alone (apply
excluded). Reads go through :class:`FeatureClient`, the serving path: one user plus
``features.bench_candidates`` random catalogue items per read, ``features.bench_reads`` timed reads after
a warm-up.
"""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from unexrl.config import Config
from unexrl.environ import environ
from unexrl.features import schema as fs
from unexrl.features.build import build_features
from unexrl.features.redis_server import local_redis, redis_server_path
from unexrl.features.store import apply, load_online, repo_path
from unexrl.policies.weights import RandomPolicy
from unexrl.sim.env import Simulator
from unexrl.simulate import simulate_logs

WARMUP_READS = 5


def bench_features(cfg: Config, logs: Path | None = None, redis: str | None = None) -> dict[str, Any]:
    """Measure both stores; ``logs`` defaults to a fresh random-policy log of ``cfg``, ``redis`` to a
    throwaway loopback redis-server (Redis is reported as skipped, with the reason, if none can be had)."""
    result: dict[str, Any] = {"config": cfg.name, "machine": _machine(), "stores": {}}
    with tempfile.TemporaryDirectory(prefix="unexrl-bench-features-") as tmp, ExitStack() as stack:
        root = Path(tmp)
        if logs is None:
            sim = Simulator(cfg)
            logs = simulate_logs(
                sim, RandomPolicy(cfg.cascade, seed=0), {"kind": "random"}, root / "logs", cfg.seeds.train[0]
            )
        features = root / "features"
        manifest = build_features(logs, features, cfg)
        tables = manifest.tables
        result["log"] = str(logs)
        result["offline_rows"] = {name: t.rows for name, t in tables.items()}
        result["online_rows"] = {
            name: _entities(features / t.file, fs.VIEWS_BY_NAME[name]) for name, t in tables.items()
        }
        world = manifest.config["world"]
        requests = _requests(cfg, world["n_users"], world["n_items"])
        environments = {"sqlite": "local"}
        if redis is None and redis_server_path() is None:
            result["stores"]["redis"] = {
                "skipped": "redis-server is not installed and no --redis address given"
            }
        else:
            stack.enter_context(environ({"UNEXRL_REDIS": redis or stack.enter_context(local_redis())}))
            environments["redis"] = "redis"
        for store_name, env in tqdm(environments.items(), desc="stores", leave=False):
            repo = root / f"repo-{store_name}"
            shutil.copytree(repo_path(cfg), repo, ignore=shutil.ignore_patterns("data", "__pycache__"))
            env_cfg = cfg.model_copy(
                update={"features": cfg.features.model_copy(update={"repo": str(repo), "environment": env})}
            )
            result["stores"][store_name] = _measure(
                env_cfg, features, sum(result["online_rows"].values()), requests
            )
    result["machine"]["load_average_1m_after"] = round(os.getloadavg()[0], 2)
    return result


def _measure(
    cfg: Config, features: Path, online_rows: int, requests: list[tuple[int, list[int]]]
) -> dict[str, Any]:
    """Materialise into a fresh store, then time reads through the client and through Feast alone."""
    from unexrl.features.client import FeatureClient

    store = apply(cfg, features)
    started = time.perf_counter()
    load_online(store, features)
    seconds = time.perf_counter() - started
    client = FeatureClient(cfg, store)
    services = {name: store.get_feature_service(name) for name in fs.SERVICES}

    def served(user: int, items: list[int]) -> None:
        if client.fetch(user, items).degraded:
            raise RuntimeError("the feature store became unreachable during the benchmark")

    def feast_alone(user: int, items: list[int]) -> None:
        for service, key, ids in (
            (fs.USER_SERVING_SERVICE, fs.USER.join_key, [user]),
            (fs.ITEM_SERVING_SERVICE, fs.ITEM.join_key, items),
        ):
            store.get_online_features(
                features=services[service], entity_rows=[{key: i} for i in ids], full_feature_names=True
            ).to_dict()

    client_s, feast_s = _latencies(requests, served), _latencies(requests, feast_alone)
    return {
        "materialise_s": round(seconds, 3),
        "materialise_rows_per_s": round(online_rows / seconds),
        "online_read_ms": _summary(client_s),
        "feast_read_ms": _summary(feast_s),
        "client_over_feast": round(statistics.median(client_s) / statistics.median(feast_s), 3),
        "reads": len(client_s),
        "candidates": len(requests[0][1]),
    }


def format_bench(result: dict[str, Any]) -> str:
    m = result["machine"]
    rows = sum(result["online_rows"].values())
    lines = [
        (
            f"bench features: config {result['config']}, {rows:,} online rows, {m['cpus']} CPUs (load average "
            f"{m['load_average_1m_before']} -> {m['load_average_1m_after']}), feast {m['feast']}"
        )
    ]
    for name, r in result["stores"].items():
        if "skipped" in r:
            lines.append(f"  {name:7s} skipped: {r['skipped']}")
            continue
        ms, raw = r["online_read_ms"], r["feast_read_ms"]
        lines.append(
            f"  {name:7s} materialise {r['materialise_rows_per_s']:>9,} rows/s ({r['materialise_s']} s)   "
            f"read user + {r['candidates']} candidates: p50 {ms['p50']} ms, p99 {ms['p99']} ms "
            f"(Feast alone: p50 {raw['p50']} ms, p99 {raw['p99']} ms)"
        )
    return "\n".join(lines)


def _entities(path: Path, view: fs.ViewSpec) -> int:
    """Rows the online store holds for a view: one per distinct entity."""
    return len(pc.unique(pq.read_table(path, columns=[view.entity.join_key])[view.entity.join_key]))


def _requests(cfg: Config, n_users: int, n_items: int) -> list[tuple[int, list[int]]]:
    """Warm-up plus timed reads: a random user and distinct random catalogue items each."""
    rng = np.random.default_rng(0)
    return [
        (
            int(rng.integers(n_users)),
            rng.choice(n_items, cfg.features.bench_candidates, replace=False).tolist(),
        )
        for _ in range(WARMUP_READS + cfg.features.bench_reads)
    ]


def _latencies(requests: list[tuple[int, list[int]]], read: Callable[[int, list[int]], None]) -> list[float]:
    latencies = []
    for i, (user, items) in enumerate(tqdm(requests, desc="online reads", leave=False)):
        started = time.perf_counter()
        read(user, items)
        if i >= WARMUP_READS:
            latencies.append(time.perf_counter() - started)
    return latencies


def _summary(latencies: list[float]) -> dict[str, float]:
    ms = np.asarray(latencies) * 1e3
    return {
        "p50": round(float(np.percentile(ms, 50)), 2),
        "p99": round(float(np.percentile(ms, 99)), 2),
        "mean": round(float(ms.mean()), 2),
    }


def _machine() -> dict[str, Any]:
    from importlib.metadata import version

    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "feast": version("feast"),
        "load_average_1m_before": round(os.getloadavg()[0], 2),
    }
