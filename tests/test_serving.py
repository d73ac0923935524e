"""The BentoML service end to end on loopback: the packaged bento serves pages with trained actors (and a CEM
shadow), feedback updates sessions, bad input gets 4xx naming the field (schemathesis finds no 5xx, and every
error body matches the OpenAPI schema), a tampered artifact is refused at start-up, and a real Prometheus
scraping the service under simulated traffic returns data for every dashboard and rule expression.

The trust boundary (docs/security.md): the API routes need the bearer token, sessions are server-issued and
bound to their user (a second client cannot read, feed or move another's session), feedback is bounded by each
item's duration, sessions end at max_requests, types are strict, bodies are bounded, and a client error is one
log line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import yaml

from unexrl.config import Config
from unexrl.contracts.artifact import ArtifactError, read_artifact
from unexrl.policies.artifact import save_weight_policy
from unexrl.policies.weights import WeightPolicy
from unexrl.serve import prometheus as prom
from unexrl.serve.local import Endpoint, local_service
from unexrl.serve.package import ARTIFACT_SUBDIR, ENV_SHADOW_MODEL, BentoInfo, build_bento, import_model
from unexrl.serve.traffic import run_traffic

ROOT = Path(__file__).resolve().parents[1]
SCHEMATHESIS_CHECKS = ",".join(
    ["not_a_server_error", "status_code_conformance", "content_type_conformance"]
    + ["response_schema_conformance", "ignored_auth"]
)


@pytest.fixture(scope="module")
def bento(tmp_path_factory: pytest.TempPathFactory, small_actors: Path) -> BentoInfo:
    os.environ.setdefault("BENTOML_HOME", str(tmp_path_factory.mktemp("bentoml")))
    return build_bento(small_actors)


@pytest.fixture(scope="module")
def service_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("service") / "service.log"


@pytest.fixture(scope="module")
def service(service_log: Path, bento: BentoInfo, cem_artifact: Path) -> Iterator[Endpoint]:
    """The built bento served on loopback, CEM as shadow; the feature store is unreachable (no repository),
    so every request exercises the fallback path."""
    shadow, _ = import_model(cem_artifact, model_name="unexrl-shadow")
    env = {ENV_SHADOW_MODEL: shadow, "UNEXRL_FEATURE_REPO": str(service_log.parent / "no-feature-store")}
    with local_service(bento.model_tag, target=bento.bento_tag, env=env, log_file=service_log) as endpoint:
        yield endpoint


def test_build_bento_pins_the_verified_artifact(bento: BentoInfo, small_actors: Path) -> None:
    import bentoml

    assert bento.model_version == read_artifact(small_actors).version
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


def test_a_signed_environment_serves_only_what_its_pipeline_signed(
    tmp_path: Path, small_cfg: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The service with UNEXRL_ARTIFACT_PUBLIC_KEYS (as in staging/prod): a self-consistent re-hashed artifact
    (new weights, manifest hashes recomputed: the model store's checks pass) never becomes ready; the
    pipeline's signed one serves."""
    import torch
    from test_signing import rehash, signed_artifact

    from unexrl.contracts.signing import ENV_PUBLIC_KEYS, generate_keys

    private, public = generate_keys(tmp_path / "keys")
    env = {ENV_PUBLIC_KEYS: str(public), "UNEXRL_FEATURE_REPO": str(tmp_path / "no-feature-store")}
    good = signed_artifact(small_cfg, tmp_path / "good", private, monkeypatch)
    bad = signed_artifact(small_cfg, tmp_path / "bad", private, monkeypatch)
    rehash(bad, torch.zeros(1, sum(small_cfg.cascade.action_dims)))
    tag, _ = import_model(bad, model_name="unexrl-rehashed")  # this process trusts no keys: hashes only
    with (
        pytest.raises(RuntimeError, match="does not verify"),
        local_service(tag, env=env, log_file=tmp_path / "bad.log", start_timeout_s=60),
    ):
        pass
    tag, version = import_model(good, model_name="unexrl-signed")
    with local_service(tag, env=env, log_file=tmp_path / "good.log") as service:
        page = _post(service, "/recommend", {"user_id": 1})
        assert page.status_code == 200 and page.json()["model_version"] == version, page.text


def test_only_the_expected_artifact_enters_the_model_store(
    tmp_path: Path, cem_artifact: Path, bento: BentoInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the gate passed is what the store holds: another artifact than the expected one is not imported,
    and a copy that differs from the verified artifact (a file changed while it was copied) is not saved."""
    import bentoml

    from unexrl.serve import package

    expected = read_artifact(cem_artifact).sha256
    with pytest.raises(ArtifactError, match="is not the expected"):
        import_model(cem_artifact, model_name="unexrl-expected", expected_sha256="0" * 64)
    copytree = shutil.copytree

    def copy_while_changing(src: Path, dst: Path, **kwargs: Any) -> Any:
        out = copytree(src, dst, **kwargs)
        with open(Path(dst) / "weights.pt", "ab") as f:
            f.write(b"\0")
        return out

    # only the import's own copy changes (BentoML's copy into its store stays shutil's)
    monkeypatch.setattr(package, "shutil", SimpleNamespace(copytree=copy_while_changing))
    with pytest.raises(ArtifactError, match="weights.pt: sha256"):
        import_model(cem_artifact, model_name="unexrl-expected", expected_sha256=expected)
    with pytest.raises(bentoml.exceptions.NotFound):
        bentoml.models.get(f"unexrl-expected:{read_artifact(cem_artifact).version}")
    monkeypatch.undo()
    assert (
        import_model(cem_artifact, model_name="unexrl-expected", expected_sha256=expected)[1] == expected[:16]
    )


def test_the_service_refuses_a_store_entry_rewritten_after_import(
    tmp_path: Path, small_cfg: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A self-consistent tamper inside the model store (new weights, manifest re-hashed) on the hash-only default:
    the tag's version is the imported artifact's digest, the manifest's is now another, so it never serves."""
    import bentoml
    import torch
    from test_signing import rehash

    artifact = save_weight_policy(
        WeightPolicy(torch.full((1, sum(small_cfg.cascade.action_dims)), 0.5), small_cfg.cascade),
        tmp_path / "a",
        small_cfg,
        algorithm="cem",
    )
    tag, version = import_model(artifact, model_name="unexrl-rewritten")
    rehash(
        Path(bentoml.models.get(tag).path) / ARTIFACT_SUBDIR,
        torch.zeros(1, sum(small_cfg.cascade.action_dims)),
    )
    # nor is it packaged again: importing the same artifact does not reuse an entry that is no longer it
    with pytest.raises(ArtifactError, match=f"model store's {tag} does not verify as the artifact.*digest"):
        import_model(artifact, model_name="unexrl-rewritten")
    env = {"UNEXRL_FEATURE_REPO": str(tmp_path / "no-feature-store")}
    with (
        pytest.raises(RuntimeError, match=f"served as version {version}, but its manifest's digest"),
        local_service(tag, env=env, log_file=tmp_path / "service.log", start_timeout_s=60),
    ):
        pass


def _post(service: Endpoint, path: str, body: object, token: str | None = None) -> httpx.Response:
    """POST as an authenticated client (``token``: another client's token; "" sends none)."""
    headers = service.headers if token is None else ({"Authorization": f"Bearer {token}"} if token else {})
    return httpx.post(f"{service.url}{path}", json=body, headers=headers, timeout=30.0)


def test_recommend_feedback_session(service: Endpoint, small_cfg: Config) -> None:
    page = _post(service, "/recommend", {"user_id": 7})
    assert page.status_code == 200, page.text
    body = page.json()
    assert len(body["items"]) == small_cfg.cascade.page_size == len(set(body["items"]))
    assert [a["stage"] for a in body["actions"]] == [s.name for s in small_cfg.cascade.stages]
    assert [list(a["weights"]) for a in body["actions"]] == [list(s.heads) for s in small_cfg.cascade.stages]
    assert [a["candidates"] for a in body["actions"]] == [small_cfg.cascade.pool_size, 16, 8]
    assert (body["step"], body["cold_start"], body["degraded"]) == (0, False, True)
    sid = body["session_id"]
    viewed = [{"item_id": body["items"][0], "watch_time_s": 1.5, "click": True}]
    fb = _post(service, "/feedback", {"request_id": body["request_id"], "session_id": sid, "items": viewed})
    assert fb.status_code == 200, fb.text
    assert fb.json()["step"] == 1 and fb.json()["session_watch_time_s"] == 1.5
    again = _post(service, "/feedback", {"request_id": body["request_id"], "session_id": sid, "items": []})
    assert again.status_code == 404 and "request_id" in again.text
    nxt = _post(service, "/recommend", {"user_id": 7, "context": {"session_id": sid}}).json()
    assert (nxt["session_id"], nxt["step"]) == (sid, 1)
    pending = _post(service, "/recommend", {"user_id": 7, "context": {"session_id": sid}}).json()
    end = _post(
        service,
        "/feedback",
        {"request_id": nxt["request_id"], "session_id": sid, "items": [], "session_end": True},
    ).json()
    assert end["session_ended"] and end["step"] == 2
    # a page still pending when its session ended cannot bring the session back
    late = _post(service, "/feedback", {"request_id": pending["request_id"], "session_id": sid, "items": []})
    assert late.status_code == 404, late.text
    ended = _post(service, "/recommend", {"user_id": 7, "context": {"session_id": sid}})
    assert ended.status_code == 404 and "context.session_id" in ended.text
    pool = list(range(100, 140))
    chosen = _post(service, "/recommend", {"user_id": 7, "candidates": pool}).json()
    assert set(chosen["items"]) <= set(pool)


def test_api_routes_need_the_token(service: Endpoint) -> None:
    for token in ("", "not-" + service.token):
        for path, body in (("/recommend", {"user_id": 7}), ("/feedback", {"request_id": "x", "items": []})):
            reply = _post(service, path, body, token=token)
            assert reply.status_code == 401, reply.text
            assert reply.json() == {"error": "a valid bearer token is required", "detail": "Authorization"}
            assert reply.headers["WWW-Authenticate"] == "Bearer"
    # the probes, the metrics and the documents are open (the NetworkPolicy limits who reaches the port)
    for path in ("/livez", "/readyz", "/metrics", "/docs.json"):
        assert httpx.get(f"{service.url}{path}", timeout=30.0).status_code == 200, path


def test_a_header_sent_twice_is_refused(service: Endpoint) -> None:
    """Two Content-Type (or Authorization) headers are a 400 naming the header: the gate would check one and
    BentoML read the other (a multipart first one was a 500)."""
    token = ("Authorization", f"Bearer {service.token}")
    json_type = ("Content-Type", "application/json")
    for headers, name in (
        ([token, ("Content-Type", "multipart/form-data"), json_type], "Content-Type"),
        ([token, ("Authorization", "Bearer x"), json_type], "Authorization"),
    ):
        reply = httpx.post(
            f"{service.url}/recommend", content=b'{"user_id": 1}', headers=headers, timeout=30.0
        )
        assert reply.status_code == 400 and reply.json()["detail"] == name, reply.text


def test_every_4xx_has_the_one_error_body(service: Endpoint) -> None:
    """Not only the POST routes' own errors: a GET of an API route and an unknown path answer ErrorBody as JSON."""
    for path, status in (("/recommend", 405), ("/no-such-route", 404)):
        reply = httpx.get(f"{service.url}{path}", headers=service.headers, timeout=30.0)
        assert reply.status_code == status and reply.headers["content-type"] == "application/json", reply.text
        assert set(reply.json()) == {"error", "detail"} and reply.json()["error"], reply.text


def test_a_second_client_cannot_take_over_a_session(service: Endpoint, small_cfg: Config) -> None:
    """Client A browses as user 11; client B (also authenticated) knows the user id and tries everything."""
    a = _post(service, "/recommend", {"user_id": 11}).json()
    sid = a["session_id"]
    watched = [{"item_id": a["items"][0], "watch_time_s": 2.0}]
    assert _post(
        service, "/feedback", {"request_id": a["request_id"], "session_id": sid, "items": watched}
    ).is_success
    a2 = _post(service, "/recommend", {"user_id": 11, "context": {"session_id": sid}}).json()
    # B asks for the user's page: a new session of its own, nothing of A's is shown to it
    b = _post(service, "/recommend", {"user_id": 11}).json()
    assert b["session_id"] != sid and b["step"] == 0
    # B names sessions it was not issued for this user: guessed ids, A's id under another user, its own id
    for user, guess in ((11, sid + 1), (11, 1), (12, sid), (12, b["session_id"])):
        reply = _post(service, "/recommend", {"user_id": user, "context": {"session_id": guess}})
        assert reply.status_code == 404 and "context.session_id" in reply.text, reply.text
    # B posts feedback for A's page under its own session, and for its own page under A's
    for request_id, session in ((a2["request_id"], b["session_id"]), (b["request_id"], sid)):
        reply = _post(service, "/feedback", {"request_id": request_id, "session_id": session, "items": []})
        assert reply.status_code == 404 and "request_id" in reply.text, reply.text
    # A's session is as A left it
    fb = _post(service, "/feedback", {"request_id": a2["request_id"], "session_id": sid, "items": []}).json()
    assert (fb["step"], fb["session_items_watched"], fb["session_watch_time_s"]) == (2, 1, 2.0)


def test_feedback_longer_than_the_item_is_refused(service: Endpoint, small_cfg: Config) -> None:
    from unexrl.sim.world import build_world

    duration = build_world(small_cfg).item_duration
    page = _post(service, "/recommend", {"user_id": 5}).json()
    item = page["items"][0]
    too_long = float(duration[item]) + 1.0
    items = [{"item_id": item, "watch_time_s": too_long}]
    reply = _post(
        service,
        "/feedback",
        {"request_id": page["request_id"], "session_id": page["session_id"], "items": items},
    )
    assert reply.status_code == 400 and "items[0].watch_time_s" in reply.text, reply.text
    items = [{"item_id": item, "watch_time_s": float(duration[item])}]
    reply = _post(
        service,
        "/feedback",
        {"request_id": page["request_id"], "session_id": page["session_id"], "items": items},
    )
    assert reply.status_code == 200, reply.text


def test_a_session_ends_at_max_requests(service: Endpoint, small_cfg: Config) -> None:
    sid = None
    for step in range(small_cfg.session.max_requests):
        body = {"user_id": 13} | ({"context": {"session_id": sid}} if sid is not None else {})
        page = _post(service, "/recommend", body).json()
        assert page["step"] == step
        sid = page["session_id"]
        fb = _post(
            service, "/feedback", {"request_id": page["request_id"], "session_id": sid, "items": []}
        ).json()
    assert fb["session_ended"] and fb["step"] == small_cfg.session.max_requests
    reply = _post(service, "/recommend", {"user_id": 13, "context": {"session_id": sid}})
    assert reply.status_code == 404, reply.text


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"user_id": True}, "user_id"),
        ({"user_id": "7"}, "user_id"),
        ({"user_id": 7.0}, "user_id"),
        ({"user_id": 7, "candidates": [True] * 20}, "candidates.0"),
        ({"user_id": 7, "context": {"session_id": "1"}}, "context.session_id"),
    ],
)
def test_types_are_strict(service: Endpoint, body: object, field: str) -> None:
    reply = _post(service, "/recommend", body)
    assert reply.status_code == 400 and reply.json()["detail"] == field, reply.text


def test_feedback_flags_are_strict(service: Endpoint) -> None:
    page = _post(service, "/recommend", {"user_id": 9}).json()
    for item in ({"click": 1}, {"like": "yes"}):
        items = [{"item_id": page["items"][0], "watch_time_s": 1.0} | item]
        reply = _post(
            service,
            "/feedback",
            {"request_id": page["request_id"], "session_id": page["session_id"], "items": items},
        )
        assert reply.status_code == 400 and reply.json()["detail"].startswith("items.0."), reply.text


def test_bodies_are_bounded(service: Endpoint) -> None:
    from unexrl.serve.api import MAX_BODY_BYTES

    big = b'{"user_id": 7, "pad": "' + b"x" * MAX_BODY_BYTES + b'"}'
    headers = {**service.headers, "Content-Type": "application/json"}
    reply = httpx.post(f"{service.url}/recommend", content=big, headers=headers, timeout=30.0)
    assert reply.status_code == 413, reply.text
    # no Content-Length (chunked): counted as it arrives
    chunks = (big[i : i + 65536] for i in range(0, len(big), 65536))
    reply = httpx.post(f"{service.url}/recommend", content=chunks, headers=headers, timeout=30.0)
    assert reply.status_code == 413 and reply.json()["detail"] == "body", reply.text
    assert _post(service, "/recommend", {"user_id": 7}).status_code == 200


def test_a_client_error_is_one_log_line(service: Endpoint, service_log: Path) -> None:
    marker = "no-such-page-3f1c"
    for _ in range(3):
        reply = _post(service, "/feedback", {"request_id": marker, "session_id": 1, "items": []})
        assert reply.status_code == 404
    reply = _post(service, "/recommend", {"user_id": "seven"})
    assert reply.status_code == 400
    time.sleep(0.5)  # the log is flushed by the child
    text = service_log.read_text(errors="replace")
    assert sum(marker in line for line in text.splitlines()) == 3, text[-3000:]
    assert "Traceback" not in text, text[-3000:]


def test_unknown_users_get_cold_start_pages(service: Endpoint, small_cfg: Config) -> None:
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
        ("/feedback", {"items": [], "session_id": 1}, "request_id"),
        ("/feedback", {"request_id": "x", "items": []}, "session_id"),
        (
            "/feedback",
            {"request_id": "x", "session_id": 1, "items": [{"item_id": 1, "watch_time_s": -1}]},
            "watch_time_s",
        ),
        ("/feedback", {"request_id": "x", "session_id": 1, "items": [{"item_id": 1}]}, "watch_time_s"),
    ],
)
def test_bad_input_is_a_4xx_naming_the_field(service: Endpoint, path: str, body: object, field: str) -> None:
    reply = _post(service, path, body)
    assert 400 <= reply.status_code < 500, reply.text
    assert field.split("[")[0] in reply.text


def test_feedback_for_items_not_on_the_page_names_the_item(service: Endpoint) -> None:
    page = _post(service, "/recommend", {"user_id": 3}).json()
    stranger = next(i for i in range(10**4) if i not in page["items"])
    at = {"request_id": page["request_id"], "session_id": page["session_id"]}
    for items, message in (
        ([{"item_id": stranger, "watch_time_s": 1.0}], "items[0].item_id"),
        ([{"item_id": page["items"][0], "watch_time_s": 1.0}] * 2, "items[1].item_id"),
    ):
        reply = _post(service, "/feedback", at | {"items": items})
        assert reply.status_code == 400 and reply.json()["detail"] == message, reply.text
    assert _post(service, "/feedback", at | {"items": []}).status_code == 200


def test_openapi_documents_every_field(service: Endpoint) -> None:
    spec = httpx.get(f"{service.url}/docs.json").json()
    schemas = spec["components"]["schemas"]
    ours = [
        "RecommendRequest",
        "RequestContext",
        "RecommendResponse",
        "StageAction",
        "FeedbackRequest",
        "FeedbackItem",
        "FeedbackResponse",
        "Health",
        "ErrorBody",
    ]
    for name in ours:
        schema = next(v for k, v in schemas.items() if k.startswith(name))
        for field, prop in schema["properties"].items():
            assert prop.get("description"), f"{name}.{field} has no description"
    for route in ("/recommend", "/feedback"):
        post = spec["paths"][route]["post"]
        assert post["security"] == [{"bearer": []}]
        for status in ("400", "401", "404", "413", "415"):
            ref = post["responses"][status]["content"]["application/json"]["schema"]["$ref"]
            assert ref == "#/components/schemas/ErrorBody", (route, status)


def test_schemathesis_finds_no_server_error_and_errors_match_the_schema(
    service: Endpoint, tmp_path: Path
) -> None:
    """Bounded fuzzing on loopback, authenticated: no 5xx; every status, content type and body (errors included)
    is the one the OpenAPI document declares; a request without the token is refused (ignored_auth)."""
    exe = Path(sys.executable).with_name("schemathesis")
    if not exe.exists():
        pytest.skip("schemathesis is not installed (the serve-test extra)")
    run = subprocess.run(
        [
            str(exe),
            "run",
            f"{service.url}/docs.json",
            "--checks",
            SCHEMATHESIS_CHECKS,
            "--header",
            f"Authorization: Bearer {service.token}",
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
    assert httpx.get(f"{service.url}/readyz").status_code == 200  # the worker survived


def test_prometheus_returns_data_for_every_dashboard_and_rule_expression(
    service: Endpoint, small_cfg: Config, tmp_path: Path
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
    host = service.url.removeprefix("http://")
    with prom.local_prometheus([host], rules) as url:
        report = run_traffic(small_cfg, service.url, service.token, sessions=16, seconds=60, concurrency=8)
        assert report.errors == 0 and report.sessions_ended > 0 and report.watch_time_s > 0, report
        for user in (-1, 10**12):
            assert _post(service, "/recommend", {"user_id": user}).status_code == 200
        missing = prom.missing_data(url, exprs)
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
