"""A throwaway Prometheus server on loopback (Debian's ``prometheus``), and the shipped rules as a plain file.

Mirrors unexrl/features/redis_server.py: our own child process on a free port, its data in a temporary
directory, stopped by its process id. Used by the monitoring integration test to check that every PromQL
expression of the dashboard and the rules returns data from a really scraped service.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml

from unexrl.bundle import monitoring_file
from unexrl.loopback import free_port, stop, wait_http_ready

PROMETHEUS_RULE = monitoring_file("prometheusrule.yaml")
DASHBOARD = monitoring_file("dashboard.json")
START_TIMEOUT_S = 20.0


def rule_groups(path: Path = PROMETHEUS_RULE) -> list[dict[str, Any]]:
    """``spec.groups`` of the PrometheusRule: the single source of the recording and alerting rules."""
    doc = yaml.safe_load(Path(path).read_text())
    if doc.get("apiVersion") != "monitoring.coreos.com/v1" or doc.get("kind") != "PrometheusRule":
        raise ValueError(f"{path}: not a monitoring.coreos.com/v1 PrometheusRule")
    return list(doc["spec"]["groups"])


def write_rules_file(out: Path, path: Path = PROMETHEUS_RULE) -> Path:
    """The PrometheusRule's groups as a plain Prometheus rules file (for promtool and a bare server)."""
    Path(out).write_text(yaml.safe_dump({"groups": rule_groups(path)}, sort_keys=False))
    return Path(out)


def dashboard_queries(path: Path = DASHBOARD) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel of the Grafana dashboard."""
    out = []
    for panel in json.loads(Path(path).read_text())["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    return out


def prometheus_path() -> str | None:
    return shutil.which("prometheus")


@contextmanager
def local_prometheus(targets: list[str], rules: Path | None = None, interval_s: float = 1.0) -> Iterator[str]:
    """Yield the base URL of a fresh Prometheus scraping ``targets`` (host:port) every ``interval_s`` and
    evaluating ``rules`` as often."""
    exe = prometheus_path()
    if exe is None:
        raise FileNotFoundError(
            "prometheus is not installed (Debian: apt-get install prometheus; `make prometheus`)"
        )
    with tempfile.TemporaryDirectory(prefix="unexrl-prometheus-") as tmp:
        config = {
            "global": {
                "scrape_interval": f"{round(interval_s * 1000)}ms",
                "evaluation_interval": f"{round(interval_s * 1000)}ms",
            },
            "scrape_configs": [{"job_name": "unexrl", "static_configs": [{"targets": targets}]}],
        }
        if rules is not None:
            config["rule_files"] = [str(rules)]
        (Path(tmp) / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        proc = subprocess.Popen(
            [
                exe,
                f"--config.file={tmp}/prometheus.yml",
                f"--storage.tsdb.path={tmp}/data",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            if not wait_http_ready(proc, f"{url}/-/ready", START_TIMEOUT_S):
                raise RuntimeError(f"prometheus did not become ready on {url}")
            yield url
        finally:
            stop(proc, 10)


def query(url: str, expr: str) -> list[dict[str, Any]]:
    """Instant query; the result vector (empty when the expression has no data)."""
    reply = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10.0)
    body = reply.json()
    if body.get("status") != "success":
        raise ValueError(f"{expr}: {body.get('errorType')}: {body.get('error')}")
    return list(body["data"]["result"])


def missing_data(url: str, exprs: list[str], timeout_s: float = 45.0) -> list[str]:
    """The expressions that still return no data once ``timeout_s`` has passed (polling every second)."""
    deadline = time.monotonic() + timeout_s
    while True:
        missing = [e for e in exprs if not query(url, e)]
        if not missing or time.monotonic() > deadline:
            return missing
        time.sleep(1.0)


def scraped_total(service_url: str, sample: str, labels: dict[str, str] | None = None) -> float:
    """The sum of every ``sample`` series (with ``labels`` among theirs) on a service's /metrics, read directly (no
    Prometheus): 0 if absent."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{service_url}/metrics", timeout=10.0).text
    want = (labels or {}).items()
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == sample and want <= s.labels.items()
    )
