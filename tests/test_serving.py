"""The BentoML service end to end on loopback: the packaged bento serves pages with trained actors (and a CEM
shadow), feedback updates sessions, bad input gets 4xx naming the field (schemathesis finds no 5xx), a
tampered artifact is refused at start-up, and a real Prometheus scraping the service under simulated traffic
returns data for every dashboard and rule expression."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from unexrl.config import Config
from unexrl.contracts.artifact import ArtifactError
from unexrl.serve import prometheus as prom
from unexrl.serve.engine import artifact_version
from unexrl.serve.local import local_service
from unexrl.serve.package import ARTIFACT_SUBDIR, ENV_SHADOW_MODEL, BentoInfo, build_bento, import_model
from unexrl.serve.traffic import run_traffic

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bento(tmp_path_factory: pytest.TempPathFactory, small_actors: Path) -> BentoInfo:
    os.environ.setdefault("BENTOML_HOME", str(tmp_path_factory.mktemp("bentoml")))
    return build_bento(small_actors)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, bento: BentoInfo, cem_artifact: Path) -> Iterator[str]:
    """The built bento served on loopback, CEM as shadow; the feature store is unreachable (no repository),
    so every request exercises the fallback path."""
    shadow, _ = import_model(cem_artifact, model_name="unexrl-shadow")
    tmp = tmp_path_factory.mktemp("service")
    env = {ENV_SHADOW_MODEL: shadow, "UNEXRL_FEATURE_REPO": str(tmp / "no-feature-store")}
    with local_service(bento.model_tag, target=bento.bento_tag, env=env, log_file=tmp / "service.log") as url:
        yield url


def test_build_bento_pins_the_verified_artifact(bento: BentoInfo, small_actors: Path) -> None:
    import bentoml

    assert bento.model_version == artifact_version(small_actors)
    assert bento.model_tag == f"unexrl-policy:{bento.model_version}"
    model = bentoml.models.get(bento.model_tag)
    assert (Path(model.path) / ARTIFACT_SUBDIR / "manifest.json").read_bytes() == (
        small_actors / "manifest.json"
    ).read_bytes()
    built = bentoml.bentos.get(bento.bento_tag)
    assert [str(m.tag) for m in built.info.all_models] == [bento.model_tag]


def test_tampered_artifact_is_refused(tmp_path: Path, cem_artifact: Path, bento: BentoInfo) -> None:
    import bentoml

    bad = tmp_path / "bad"
    shutil.copytree(cem_artifact, bad)
    with open(bad / "weights.pt", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ArtifactError, match="tampered"):
        build_bento(bad)
    # tampered after import, inside the model store: the service refuses to start
    tag, _ = import_model(cem_artifact, model_name="unexrl-tampered")
    with open(Path(bentoml.models.get(tag).path) / ARTIFACT_SUBDIR / "weights.pt", "ab") as f:
        f.write(b"\0")
    with (
        pytest.raises(RuntimeError, match="tampered"),
        local_service(tag, log_file=tmp_path / "service.log", start_timeout_s=90),
    ):
        pass


def _post(url: str, path: str, body: object) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=30.0)


def test_recommend_feedback_session(service: str, small_cfg: Config) -> None:
    page = _post(service, "/recommend", {"user_id": 7, "context": {"session_id": 42}})
    assert page.status_code == 200, page.text
    body = page.json()
    assert len(body["items"]) == small_cfg.cascade.page_size == len(set(body["items"]))
    assert [a["stage"] for a in body["actions"]] == [s.name for s in small_cfg.cascade.stages]
    assert [list(a["weights"]) for a in body["actions"]] == [list(s.heads) for s in small_cfg.cascade.stages]
    assert [a["candidates"] for a in body["actions"]] == [small_cfg.cascade.pool_size, 16, 8]
    assert (body["session_id"], body["step"], body["cold_start"], body["degraded"]) == (42, 0, False, True)
    viewed = [{"item_id": body["items"][0], "watch_time_s": 12.5, "click": True}]
    fb = _post(service, "/feedback", {"request_id": body["request_id"], "items": viewed})
    assert fb.status_code == 200, fb.text
    assert fb.json()["step"] == 1 and fb.json()["session_watch_time_s"] == 12.5
    again = _post(service, "/feedback", {"request_id": body["request_id"], "items": []})
    assert again.status_code == 404 and "request_id" in again.text
    nxt = _post(service, "/recommend", {"user_id": 7}).json()
    assert (nxt["session_id"], nxt["step"]) == (42, 1)
    end = _post(
        service, "/feedback", {"request_id": nxt["request_id"], "items": [], "session_end": True}
    ).json()
    assert end["session_ended"] and end["step"] == 2
    pool = list(range(100, 140))
    chosen = _post(service, "/recommend", {"user_id": 7, "candidates": pool}).json()
    assert set(chosen["items"]) <= set(pool)


def test_unknown_users_get_cold_start_pages(service: str, small_cfg: Config) -> None:
    for user in (small_cfg.world.n_users, 10**15, -3):
        reply = _post(service, "/recommend", {"user_id": user})
        assert reply.status_code == 200, reply.text
        assert reply.json()["cold_start"] and len(reply.json()["items"]) == small_cfg.cascade.page_size


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/recommend", {"user_id": "seven"}, "user_id"),
        ("/recommend", {"user_id": 2**70}, "user_id"),
        ("/recommend", {"user_id": 1, "candidates": [1, 2, 3]}, "candidates"),
        ("/recommend", {"user_id": 1, "candidates": list(range(15)) + [10**9]}, "candidates[15]"),
        ("/recommend", {"user_id": 1, "context": {"session_id": -1}}, "session_id"),
        ("/feedback", {"items": []}, "request_id"),
        ("/feedback", {"request_id": "x", "items": [{"item_id": 1, "watch_time_s": -1}]}, "watch_time_s"),
        ("/feedback", {"request_id": "x", "items": [{"item_id": 1}]}, "watch_time_s"),
    ],
)
def test_bad_input_is_a_4xx_naming_the_field(service: str, path: str, body: object, field: str) -> None:
    reply = _post(service, path, body)
    assert 400 <= reply.status_code < 500, reply.text
    assert field.split("[")[0] in reply.text


def test_feedback_for_items_not_on_the_page_names_the_item(service: str) -> None:
    page = _post(service, "/recommend", {"user_id": 3}).json()
    stranger = next(i for i in range(10**4) if i not in page["items"])
    for items, message in (
        ([{"item_id": stranger, "watch_time_s": 1.0}], "items[0].item_id"),
        ([{"item_id": page["items"][0], "watch_time_s": 1.0}] * 2, "items[1].item_id"),
    ):
        reply = _post(service, "/feedback", {"request_id": page["request_id"], "items": items})
        assert reply.status_code == 400 and message in reply.text, reply.text
    assert _post(service, "/feedback", {"request_id": page["request_id"], "items": []}).status_code == 200


def test_openapi_documents_every_field(service: str) -> None:
    schemas = httpx.get(f"{service}/docs.json").json()["components"]["schemas"]
    ours = [
        "RecommendRequest",
        "RequestContext",
        "RecommendResponse",
        "StageAction",
        "FeedbackRequest",
        "FeedbackItem",
        "FeedbackResponse",
        "Health",
    ]
    for name in ours:
        schema = next(v for k, v in schemas.items() if k.startswith(name))
        for field, spec in schema["properties"].items():
            assert spec.get("description"), f"{name}.{field} has no description"


def test_schemathesis_finds_no_server_error(service: str, tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("schemathesis")
    if not exe.exists():
        pytest.skip("schemathesis is not installed (the serve-test extra)")
    run = subprocess.run(
        [
            str(exe),
            "run",
            f"{service}/docs.json",
            "--checks",
            "not_a_server_error",
            "--include-path-regex",
            "^/(recommend|feedback|version)$",
            "--max-examples",
            "20",
            "--max-time",
            "30",
            "--workers",
            "1",
            "--suppress-health-check",
            "all",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=tmp_path,  # it writes .schemathesis/ there
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert httpx.get(f"{service}/readyz").status_code == 200  # the worker survived


def test_prometheus_returns_data_for_every_dashboard_and_rule_expression(
    service: str, small_cfg: Config, tmp_path: Path
) -> None:
    if prom.prometheus_path() is None or shutil.which("promtool") is None:
        pytest.skip("prometheus/promtool not installed (make prometheus installs Debian's package)")
    rules = prom.write_rules_file(tmp_path / "rules.yaml")
    check = subprocess.run(
        ["promtool", "check", "rules", str(rules)], capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr
    groups = yaml.safe_load(rules.read_text())["groups"]
    records = [r["expr"] for g in groups for r in g["rules"] if "record" in r]
    # an alert's expression has data only while it fires; its input (the recorded series it compares) must
    alert_inputs = [r["expr"].split(" ")[0] for g in groups for r in g["rules"] if "alert" in r]
    exprs = records + alert_inputs + [e for _, e in prom.dashboard_queries()]
    host = service.removeprefix("http://")
    with prom.local_prometheus([host], rules) as url:
        report = run_traffic(small_cfg, service, sessions=16, seconds=60, concurrency=8)
        assert report.errors == 0 and report.sessions_ended > 0 and report.watch_time_s > 0, report
        for user in (-1, 10**12):
            assert _post(service, "/recommend", {"user_id": user}).status_code == 200
        deadline = time.monotonic() + 45
        while True:
            missing = [e for e in exprs if not prom.query(url, e)]
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        assert not missing, f"no data for: {missing}"
        loaded = httpx.get(f"{url}/api/v1/rules").json()["data"]["groups"]
        assert sum(len(g["rules"]) for g in loaded) == sum(len(g["rules"]) for g in groups)
        assert all(r["health"] == "ok" for g in loaded for r in g["rules"]), loaded


def _passing_decision(artifact: Path, out: Path) -> Path:
    """What the gate writes when it passes ``artifact`` (package ships nothing else)."""
    from unexrl.contracts.evaluation import GateCheck, GateDecision
    from unexrl.evaluate.stats import Estimate
    from unexrl.io import sha256_file

    GateDecision(
        candidate_sha256=sha256_file(artifact / "manifest.json"),
        passed=True,
        min_uplift_pct=1.0,
        latency_budget_ms=50.0,
        uplift_vs_incumbent_pct=Estimate(mean=2.0, low=1.0, high=3.0),
        checks=[GateCheck(check="uplift >= 1.0%", ok=True, detail="+2.000%")],
        reasons=[],
    ).write(out)
    return out


def test_bento_holds_the_project_sources_only(tmp_path: Path, small_actors: Path, cem_artifact: Path) -> None:
    """make run keeps its BentoML store inside the build context (runs/<out>/bentoml): building there twice must
    not copy the store, or the bentos already in it, into the new bento. Each build in its own process, as the
    pipeline's package task runs it (BentoML reads BENTOML_HOME once, at import)."""
    store = ROOT / "runs" / f".test-bento-store-{os.getpid()}"
    store.mkdir(parents=True)
    try:
        for i, artifact in enumerate((cem_artifact, small_actors)):
            decision = _passing_decision(artifact, tmp_path / f"decision{i}.json")
            code = (
                "import sys; from pathlib import Path; from unexrl.pipeline.release import package; "
                "package(Path(sys.argv[1]), Path(sys.argv[2]), decision=Path(sys.argv[4]), bentoml_home=sys.argv[3])"
            )
            built = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    code,
                    str(artifact),
                    str(tmp_path / f"b{i}"),
                    str(store),
                    str(decision),
                ],
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=False,
            )
            assert built.returncode == 0, built.stderr[-2000:]
        bentos = sorted((store / "bentos" / "unexrl-serving").glob("*/src"))
        assert len(bentos) == 2
        for src in bentos:
            # bentofile.yaml: BentoML writes the build file it used beside the sources
            assert {p.name for p in src.iterdir()} == {
                "serving",
                "unexrl",
                "feature_repo",
                "pyproject.toml",
                "bentofile.yaml",
            }
    finally:
        shutil.rmtree(store, ignore_errors=True)
