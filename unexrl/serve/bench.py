"""`unexrl bench serve`: /recommend against the service's own trivial endpoint, measured in one run.

For each pool size (the config's, and the paper's 2000 -> 500 -> 100 -> 10 on the same world) a fixed-weight
policy is imported and the service started on loopback. Sequential keep-alive requests alternate between
/recommend and /version (the framework floor: same process, same HTTP stack, no model work), so machine load
hits both alike; the ratio of their medians is the figure. Each round also answers the page (/feedback) and asks
for the session's next page, timed apart (a later page reads the session's state). Then wrk measures peak /recommend requests/s and
holds 80% of it for ``load_seconds``, reporting the error rate (non-2xx and socket errors).

Features: ``none`` serves with the feature store unreachable (the user read is the cheap fallback); ``live``
starts a redis-server on loopback, materialises a log's features into it with the pipeline's steps, and serves
with live user features and sessions on that Redis, as a replica in production does; ``feature_fallbacks`` is
the service's own fallback counter afterwards (0: every user's features came from the store).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx

from unexrl.config import Config
from unexrl.features.redis_server import local_redis
from unexrl.policies.artifact import save_weight_policy
from unexrl.policies.weights import WeightPolicy, greedy_weights
from unexrl.serve.local import Endpoint, live_feature_env, local_service
from unexrl.serve.package import import_model
from unexrl.serve.prometheus import scraped_total

PAPER_CASCADE = {"pool_size": 2000, "keep": (500, 100, 10)}
_WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("UNEXRL_BENCH_TOKEN")
local users = tonumber(os.getenv("UNEXRL_BENCH_USERS"))
local pause = tonumber(os.getenv("UNEXRL_BENCH_DELAY_MS"))
function request() return wrk.format(nil, nil, nil, '{"user_id": ' .. math.random(0, users - 1) .. '}') end
function delay() return pause end
"""


def paper_pool(cfg: Config) -> Config:
    """``cfg`` with the paper's pool and stage sizes (same world, heads and noise)."""
    tree = cfg.to_dict()
    tree["cascade"]["pool_size"] = PAPER_CASCADE["pool_size"]
    for stage, keep in zip(tree["cascade"]["stages"], PAPER_CASCADE["keep"]):
        stage["keep"] = keep
    return Config.model_validate_json(json.dumps(tree))


def _percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def _sequential(service: Endpoint, n: int, users: int) -> dict[str, dict[str, float]]:
    """Per round, one after another: a session's first page (/recommend), the floor (/version), the page's feedback
    (two items viewed) and the session's next page (`recommend_later`: the session's own state and features)."""
    times: dict[str, list[float]] = {"recommend": [], "version": [], "feedback": [], "recommend_later": []}
    with httpx.Client(base_url=service.url, headers=service.headers, timeout=30.0) as client:

        def post(name: str, path: str, body: dict[str, Any], keep: bool) -> dict[str, Any]:
            t0 = time.perf_counter()
            reply = client.post(path, json=body)
            dt = time.perf_counter() - t0
            reply.raise_for_status()
            if keep:
                times[name].append(dt)
            return reply.json()

        for i in range(n + 20):
            keep = i >= 20  # warm-up excluded
            page = post("recommend", "/recommend", {"user_id": i % users}, keep)
            post("version", "/version", {}, keep)
            viewed = [{"item_id": item, "watch_time_s": 1.5} for item in page["items"][:2]]
            session = {"request_id": page["request_id"], "session_id": page["session_id"], "items": viewed}
            post("feedback", "/feedback", session, keep)
            later = {"user_id": i % users, "context": {"session_id": page["session_id"]}}
            post("recommend_later", "/recommend", later, keep)
    return {
        name: {
            "p50_ms": 1e3 * statistics.median(t),
            "p99_ms": 1e3 * _percentile(t, 99),
            "sequential_rps": len(t) / sum(t),
        }
        for name, t in times.items()
    }


def _wrk(
    service: Endpoint, seconds: float, connections: int, delay_ms: float, users: int, script: Path
) -> dict[str, float]:
    env = {
        **os.environ,
        "UNEXRL_BENCH_TOKEN": service.token,
        "UNEXRL_BENCH_USERS": str(users),
        "UNEXRL_BENCH_DELAY_MS": str(int(max(delay_ms, 0))),
    }
    out = subprocess.run(
        [
            "wrk",
            "-t",
            "2",
            "-c",
            str(connections),
            "-d",
            f"{max(int(seconds), 1)}s",
            "--timeout",
            "10s",
            "-s",
            str(script),
            f"{service.url}/recommend",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors = (int(non2xx.group(1)) if non2xx else 0) + (sum(int(g) for g in sock.groups()) if sock else 0)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    return {"requests": total, "errors": errors, "error_rate": errors / max(total, 1), "rps": rps}


def _load_test(
    service: Endpoint, users: int, load_seconds: float, p50_ms: float, script: Path
) -> dict[str, Any]:
    """Peak closed-loop rps with wrk, then ~80% of it paced by a per-request delay on each connection."""
    connections = 8
    peak = _wrk(service, 5, connections, 0, users, script)
    target = 0.8 * peak["rps"]
    delay = connections * 1000.0 / target - p50_ms  # each connection: one request per (latency + delay)
    for _ in range(2):  # correct for the latency actually seen at that rate
        probe = _wrk(service, 3, connections, delay, users, script)
        delay += connections * 1000.0 * (1 / target - 1 / max(probe["rps"], 1e-9))
    held = _wrk(service, load_seconds, connections, delay, users, script)
    return {
        "peak_rps": peak["rps"],
        "target_rps": target,
        "delay_ms": max(delay, 0.0),
        "held": held,
        "held_fraction_of_peak": held["rps"] / peak["rps"],
    }


def bench_serve(
    cfg: Config,
    *,
    requests: int = 400,
    load_seconds: float = 60.0,
    include_paper: bool = True,
    features: str = "none",
    logs: Path | None = None,
) -> dict[str, Any]:
    """Latency, throughput and the load test per pool size; see the module docstring."""
    if shutil.which("wrk") is None:
        raise FileNotFoundError("wrk is not installed (Debian: apt-get install wrk; `make prometheus`)")
    if features not in ("none", "live"):
        raise ValueError(f"features={features!r}: expected none or live")
    cases = [("config", cfg)] + ([("paper", paper_pool(cfg))] if include_paper else [])
    out: dict[str, Any] = {
        "config": cfg.name,
        "requests": requests,
        "load_seconds": load_seconds,
        "features": features,
        "cases": {},
    }
    with tempfile.TemporaryDirectory(prefix="unexrl-bench-serve-") as tmp, ExitStack() as stack:
        os.environ.setdefault(
            "BENTOML_HOME", f"{tmp}/bentoml"
        )  # takes effect unless BentoML is already in use
        script = Path(tmp) / "recommend.lua"
        script.write_text(_WRK_SCRIPT)
        env = (
            live_feature_env(cfg, Path(tmp), stack.enter_context(local_redis()), logs)
            if features == "live"
            else {"UNEXRL_FEATURE_REPO": str(Path(tmp) / "no-feature-store")}
        )
        for name, case in cases:
            artifact = save_weight_policy(
                WeightPolicy(greedy_weights(case.cascade), case.cascade),
                Path(tmp) / name,
                case,
                algorithm="greedy",
            )
            tag, _ = import_model(artifact, model_name=f"unexrl-bench-{name}")
            with local_service(tag, env=env, log_file=Path(tmp) / f"{name}.log") as service:
                seq = _sequential(service, requests, case.world.n_users)
                load = _load_test(
                    service, case.world.n_users, load_seconds, seq["recommend"]["p50_ms"], script
                )
                fallbacks = scraped_total(service.url, "unexrl_feature_store_fallbacks_total")
            out["cases"][name] = {
                "pool_size": case.cascade.pool_size,
                "keep": [s.keep for s in case.cascade.stages],
                **seq,
                "recommend_p50_ms": seq["recommend"]["p50_ms"],
                "floor_p50_ms": seq["version"]["p50_ms"],
                "feature_fallbacks": fallbacks,
                "p50_ratio": seq["recommend"]["p50_ms"] / seq["version"]["p50_ms"],
                "p99_ratio": seq["recommend"]["p99_ms"] / seq["version"]["p99_ms"],
                "load": load,
            }
    return out


def format_bench_serve(result: dict[str, Any]) -> str:
    lines = [
        (
            f"bench serve ({result['config']}, features {result['features']}): "
            f"{result['requests']} sequential requests per endpoint, "
            f"load test {result['load_seconds']:.0f} s at 80% of peak"
        )
    ]
    for name, c in result["cases"].items():
        r, v, load = c["recommend"], c["version"], c["load"]
        f, later = c["feedback"], c["recommend_later"]
        lines.append(
            f"  {name} pool {c['pool_size']} keep {c['keep']}: /recommend p50 {r['p50_ms']:.2f} ms p99 {r['p99_ms']:.2f} ms "
            f"({r['sequential_rps']:.0f} req/s); /version p50 {v['p50_ms']:.2f} ms p99 {v['p99_ms']:.2f} ms; "
            f"/feedback p50 {f['p50_ms']:.2f} ms; a later page p50 {later['p50_ms']:.2f} ms; "
            f"p50 ratio {c['p50_ratio']:.2f}; {c['feature_fallbacks']:.0f} feature fallbacks; peak {load['peak_rps']:.0f} req/s, held {load['held']['rps']:.0f} req/s "
            f"({load['held_fraction_of_peak']:.0%}) with {load['held']['errors']} errors in {load['held']['requests']}"
        )
    return "\n".join(lines)
