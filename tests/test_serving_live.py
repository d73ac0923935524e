"""Serving on a live feature store, two replicas, no affinity: real redis-server, bentoml and prometheus processes.

A log's features are built and materialised into Redis as the pipeline's steps do (unexrl.serve.local.
live_feature_env: build_features, then a fresh repository copy materialised); two service processes read their
user features from it and keep sessions and pending pages on the same Redis (UNEXRL_SESSION_STORE=redis):
- either replica gives the same page for the same request, feedback is accepted by the replica that did not
  serve the page, and only once across both;
- `unexrl traffic` round-robin over both replicas (every feedback on the other replica) runs every session to its
  end without an error, the replicas' long-term-reward metrics add up to what the simulated users did, each
  replica credits the sessions of the other's pages to the other's model (the replicas serve two model versions,
  as during a canary), a real Prometheus scraping both returns data for every recording rule, and the feature
  fallback counter stays at 0.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
import yaml

from unexrl.cli import main
from unexrl.config import Config
from unexrl.serve import prometheus as prom
from unexrl.serve.local import Endpoint, live_feature_env, local_service
from unexrl.serve.package import import_model

ROOT = Path(__file__).resolve().parents[1]
LOG_SESSIONS = 1500
"""enough sessions on the small world (600 users) that most users have a behaviour row"""


@pytest.fixture(scope="module")
def live_env(
    small_cfg: Config, redis_address: str, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    """A log's features, built and materialised into Redis; a replica's environment."""
    cfg = small_cfg.model_copy(
        update={"logging": small_cfg.logging.model_copy(update={"sessions": LOG_SESSIONS, "batch_size": 500})}
    )
    return live_feature_env(cfg, tmp_path_factory.mktemp("live-store"), redis_address)


@pytest.fixture(scope="module")
def replicas(
    small_actors: Path, cem_artifact: Path, live_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Endpoint, Endpoint]]:
    """A stable replica (the trained actors) and a canary one (CEM): two model versions, as during a canary."""
    logs = tmp_path_factory.mktemp("replicas")
    stable, _ = import_model(small_actors, model_name="unexrl-live")
    canary, _ = import_model(cem_artifact, model_name="unexrl-live-canary")
    env = live_env | {"UNEXRL_API_TOKEN": secrets.token_urlsafe(32)}  # one token, as behind one gateway
    with ExitStack() as stack:
        a, b = (
            stack.enter_context(local_service(tag, env=env, log_file=logs / f"{name}.log"))
            for name, tag in (("a", stable), ("b", canary))
        )
        yield a, b


def _post(service: Endpoint, path: str, body: dict[str, object]) -> httpx.Response:
    return httpx.post(f"{service.url}{path}", json=body, headers=service.headers, timeout=30.0)


def _watched(page: dict[str, object]) -> list[dict[str, object]]:
    return [{"item_id": i, "watch_time_s": 1.0} for i in page["items"][:2]]  # type: ignore[index]


def test_either_replica_serves_the_session(replicas: tuple[Endpoint, Endpoint]) -> None:
    a, b = replicas
    first = _post(a, "/recommend", {"user_id": 7})
    assert first.status_code == 200 and not first.json()["degraded"], first.text
    page = first.json()
    session = page["session_id"]
    fed = _post(
        b, "/feedback", {"request_id": page["request_id"], "session_id": session, "items": _watched(page)}
    )
    assert fed.status_code == 200 and fed.json()["step"] == 1, (
        fed.text
    )  # the page was served by the other one
    for step in (1, 3):
        asked = {"user_id": 7, "context": {"session_id": session}}
        on_a, on_b = _post(a, "/recommend", asked).json(), _post(b, "/recommend", asked).json()
        assert on_a["step"] == on_b["step"] == step
        # b's page, asked for while a's is unanswered, leaves a's items out: b reads the session's pending pages
        assert set(on_a["items"]).isdisjoint(on_b["items"])
        for served in (on_b, on_a):
            body = {"request_id": served["request_id"], "session_id": session, "items": _watched(served)}
            assert _post(a, "/feedback", body).status_code == 200
            assert _post(b, "/feedback", body).status_code == 404  # accepted once, whichever replica is asked


def _samples(service: Endpoint, name: str, version: str | None = None) -> float:
    return prom.scraped_total(service.url, name, None if version is None else {"model_version": version})


def test_round_robin_traffic_adds_up_and_prometheus_has_every_rule(
    replicas: tuple[Endpoint, Endpoint], small_cfg: Config, tmp_path: Path
) -> None:
    if prom.prometheus_path() is None:
        pytest.skip("prometheus not installed (make prometheus installs Debian's package)")
    a, b = replicas
    names = (
        "unexrl_sessions_ended_total",
        "unexrl_session_watch_time_seconds_total",
        "unexrl_feedback_rejected_total",
    )
    before = {n: _samples(a, n) + _samples(b, n) for n in names}
    version = {s: _post(s, "/version", {}).json()["model_version"] for s in (a, b)}
    # what each replica records under the other's model: the sessions of the pages the other chose
    crossed = {s: _samples(s, names[0], version[o]) for s, o in ((a, b), (b, a))}
    rules = prom.write_rules_file(tmp_path / "rules.yaml")
    groups = yaml.safe_load(rules.read_text())["groups"]
    records = [r["record"] for g in groups for r in g["rules"] if "record" in r]
    token = tmp_path / "token"
    token.write_text(a.token)
    report = tmp_path / "traffic.json"
    hosts = [a.url.removeprefix("http://"), b.url.removeprefix("http://")]
    with prom.local_prometheus(hosts, rules) as url:
        code = main(
            ["traffic", "--config", str(ROOT / "configs" / "small.yaml"), "--url", a.url, "--url", b.url]
            + ["--token-file", str(token), "--sessions", "16", "--seconds", "120", "--json", str(report)]
        )
        traffic = json.loads(report.read_text())
        assert code == 0 and traffic["errors"] == 0 and traffic["sessions_ended"] == 16, traffic
        missing = prom.missing_data(url, records)
        assert not missing, f"no data for: {missing}"
    after = {n: _samples(a, n) + _samples(b, n) for n in names}
    assert after[names[0]] - before[names[0]] == pytest.approx(16)
    assert after[names[1]] - before[names[1]] == pytest.approx(traffic["watch_time_s"], rel=1e-4)
    assert after[names[2]] == before[names[2]]  # no feedback refused: every replica found every page
    # every feedback reached the replica that did not choose its page: its session is credited to the page's model
    assert all(_samples(s, names[0], version[o]) > crossed[s] for s, o in ((a, b), (b, a)))
    fallbacks = "unexrl_feature_store_fallbacks_total"
    assert _samples(a, fallbacks) + _samples(b, fallbacks) == 0
