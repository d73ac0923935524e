"""Every component through its ``.python_func``, in this process, chained step by step on a tiny small-config run:
the typed signature, the artifact paths and metadata, and the call into unexrl.pipeline."""

import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from kfp.dsl import Artifact, Dataset, Markdown, Metrics, Model

import components as c
from unexrl.contracts import files
from unexrl.contracts.artifact import ArtifactError
from unexrl.contracts.evaluation import GateDecision
from unexrl.contracts.release import BentoRecord
from unexrl.data import LogValidationError, read_logs
from unexrl.features import schema as fs
from unexrl.features.training_set import (
    TrainingSetMismatch,
    precheck_training_set,
    verify_training_set,
)
from unexrl.io import sha256_file
from unexrl.pipeline import registry, release
from unexrl.pipeline.release import init_manifests_repo

TINY = [
    "cem.iterations=2",
    "cem.population=4",
    "cem.sessions_per_candidate=8",
    "logging.sessions=40",
    "train.updates=4",
    "train.eval_every=2",
    "train.checkpoint_every=4",
    "train.eval_sessions=16",
    "algo.batch_size=32",
    "evaluation.sessions_per_seed=40",
    "evaluation.bootstrap=50",
]
ENV = "staging"


def art(kind, path: Path):
    return kind(name=path.name, uri=str(path), metadata={})


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """simulate -> ingest -> features -> materialize -> training set -> train -> evaluate, each via python_func."""
    d = tmp_path_factory.mktemp("components")
    torch.set_num_threads(1)
    a = {
        "incumbent": art(Model, d / "incumbent"),
        "sim_logs": art(Dataset, d / "sim_logs"),
        "cem": art(Model, d / "cem"),
        "logs": art(Dataset, d / "logs"),
        "features": art(Dataset, d / "features"),
        "store": art(Artifact, d / "store"),
        "tset": art(Dataset, d / "training_set.parquet"),
        "model": art(Model, d / "model"),
        "train_metrics": art(Metrics, d / "train_metrics"),
        "evaluation": art(Artifact, d / "evaluation"),
        "eval_metrics": art(Metrics, d / "eval_metrics"),
        "report": art(Markdown, d / "report.md"),
    }
    assert (
        c.resolve_incumbent.python_func(
            registry=str(d / "registry"), environment=ENV, incumbent=a["incumbent"]
        )
        is False
    )
    c.simulate_logs.python_func(
        config="small",
        config_overrides=TINY,
        log_seed=-1,
        logs_uri="",
        incumbent=a["incumbent"],
        logs=a["sim_logs"],
        cem=a["cem"],
    )
    c.ingest_logs.python_func(
        config="small", config_overrides=TINY, logs_uri="", simulated=a["sim_logs"], logs=a["logs"]
    )
    c.build_features.python_func(
        config="small", config_overrides=TINY, logs=a["logs"], features=a["features"]
    )
    c.materialize_features.python_func(
        config="small",
        config_overrides=TINY,
        features=a["features"],
        feature_store=a["store"],
        serving_registry=str(d / "feast" / "registry.db"),
    )
    assert (d / "feast" / "registry.db").read_bytes() == (
        Path(a["store"].path) / "data" / "registry.db"
    ).read_bytes()
    c.build_training_set.python_func(
        config="small",
        config_overrides=TINY,
        logs=a["logs"],
        features=a["features"],
        feature_store=a["store"],
        training_set=a["tset"],
    )
    c.train.python_func(
        config="small",
        config_overrides=TINY,
        algo="unexrl-cic",
        train_nodes=1,
        train_workers=1,
        train_job_kind="trainjob",
        train_image="unused",
        namespace="kubeflow",
        data_pvc="unexrl-data",
        mount_path="/data",
        gpu_type="nvidia.com/gpu",
        gpu_node_selector={},
        gpu_tolerations=[],
        logs=a["logs"],
        training_set=a["tset"],
        cem=a["cem"],
        model=a["model"],
        metrics=a["train_metrics"],
    )
    c.evaluate.python_func(
        config="small",
        config_overrides=TINY,
        evaluation_seeds=[],
        candidate=a["model"],
        cem=a["cem"],
        incumbent=a["incumbent"],
        evaluation=a["evaluation"],
        metrics=a["eval_metrics"],
        report=a["report"],
    )
    return a | {"dir": d}


def test_data_steps(chain: dict) -> None:
    assert (
        chain["sim_logs"].metadata["behaviour"] == "cem" and chain["logs"].metadata["source"] == "simulated"
    )
    assert chain["logs"].metadata["rows"]["transitions.parquet"] == chain["tset"].metadata["rows"] > 0
    assert set(chain["features"].metadata["rows"]) == {v.name for v in fs.VIEWS}
    assert (Path(chain["store"].path) / "definitions.py").is_file()
    checked = verify_training_set(Path(chain["tset"].path), read_logs(Path(chain["logs"].path)))
    assert checked.record.rows == checked.table.num_rows == chain["tset"].metadata["rows"]
    # the record hashes the bytes the returned table was parsed from
    assert checked.record.sha256 == sha256_file(Path(chain["tset"].path))


def test_train_and_evaluate(chain: dict) -> None:
    assert chain["model"].metadata == {"algorithm": "unexrl-cic", "updates": 4, "world_size": 1}
    assert chain["train_metrics"].metadata["updates"] == 4
    manifest = json.loads((Path(chain["model"].path) / "manifest.json").read_text())
    assert manifest["training_data"]["training_set"]["rows"] == chain["tset"].metadata["rows"]
    summary = json.loads((Path(chain["evaluation"].path) / "summary.json").read_text())
    assert summary["incumbent"] == {"name": "cem", "artifact": chain["cem"].path, "first_release": True}
    assert set(summary["policies"]) == {"candidate", "cem"}
    assert "uplift_vs_incumbent_pct_low" in chain["eval_metrics"].metadata
    assert Path(chain["report"].path).read_text().startswith("# Candidate evaluation")


def test_gate_package_deploy(chain: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    decision, report = art(Artifact, tmp_path / "decision.json"), art(Markdown, tmp_path / "gate.md")
    # a threshold of -100% leaves the CI and the guardrails to decide; the tiny candidate is close to CEM
    passed = c.gate.python_func(
        evaluation=chain["evaluation"],
        min_uplift_pct=-100.0,
        latency_budget_ms=1e6,
        decision=decision,
        report=report,
    )
    recorded = json.loads(Path(decision.path).read_text())
    assert passed == recorded["passed"] == decision.metadata["passed"]
    assert Path(report.path).read_text().startswith("# Gate: ")
    refused = c.gate.python_func(
        evaluation=chain["evaluation"],
        min_uplift_pct=1000.0,
        latency_budget_ms=1e-6,
        decision=decision,
        report=report,
    )
    assert refused is False and {"uplift >= 1000.0%", "latency p99 <= 1e-06 ms"} <= set(
        decision.metadata["reasons"]
    )

    # package ships only what a passing decision names: the refused one above, another candidate, then this one
    bento = art(Artifact, tmp_path / "bento")
    with pytest.raises(ArtifactError, match="the gate refused this candidate"):
        c.package.python_func(model=chain["model"], decision=decision, bentoml_home="", bento=bento)
    verdict = GateDecision.read(Path(decision.path))
    checks = [check.model_copy(update={"ok": True}) for check in verdict.checks]
    passing = verdict.model_copy(update={"passed": True, "reasons": [], "checks": checks})
    passing.model_copy(update={"candidate_sha256": "0" * 64}).write(tmp_path / "other.json")
    with pytest.raises(ArtifactError, match="is not the candidate the gate passed"):
        c.package.python_func(
            model=chain["model"],
            decision=art(Artifact, tmp_path / "other.json"),
            bentoml_home="",
            bento=bento,
        )
    assert verdict.candidate_sha256 == sha256_file(Path(chain["model"].path) / "manifest.json")
    passing.write(tmp_path / "passing.json")
    c.package.python_func(
        model=chain["model"],
        decision=art(Artifact, tmp_path / "passing.json"),
        bentoml_home=str(tmp_path / "bentoml"),
        bento=bento,
    )
    assert bento.metadata["bento_tag"].startswith("unexrl-serving:") and bento.metadata["image_tag"]
    # the candidate replaced by another artifact right after package's own check: the import refuses it
    swapped = tmp_path / "swapped"
    shutil.copytree(chain["model"].path, swapped)
    check = release.read_artifact

    def check_then_swap(path: Path, *args: object) -> object:
        out = check(path, *args)
        shutil.rmtree(swapped)
        shutil.copytree(chain["cem"].path, swapped)
        return out

    with monkeypatch.context() as patch:
        patch.setattr(release, "read_artifact", check_then_swap)
        with pytest.raises(ArtifactError, match="is not the expected"):
            release.package(
                swapped,
                tmp_path / "bento2",
                decision=tmp_path / "passing.json",
                bentoml_home=str(tmp_path / "b2"),
            )
    # the Bento leaves the step's own store as an archive CI can import: the Bento it names, hashed in the record
    archive = Path(bento.path) / files.BENTO_ARCHIVE
    assert sha256_file(archive) == BentoRecord.read(Path(bento.path) / files.BENTO).archive_sha256
    with tarfile.open(archive) as tar:
        described = yaml.safe_load(tar.extractfile("./bento.yaml").read())  # type: ignore[union-attr]
    assert f"{described['name']}:{described['version']}" == bento.metadata["bento_tag"]
    tree = tmp_path / "k8s" / "overlays" / ENV
    tree.mkdir(parents=True)
    (tree / "kustomization.yaml").write_text("images:\n  - name: unexrl-serving\n    newTag: old\n")
    repo = init_manifests_repo(tmp_path / "m.git", tmp_path / "k8s")
    sha = c.deploy.python_func(
        bento=bento,
        model=chain["model"],
        gitops_repo=str(repo),
        environment=ENV,
        gitops_branch="release",
        registry=str(tmp_path / "registry"),
    )
    assert (
        subprocess.run(
            ["git", "--git-dir", str(repo), "rev-parse", "release"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        == sha
    )
    assert registry.deployed(tmp_path / "registry", ENV).model_version == bento.metadata["model_version"]
    incumbent = art(Model, tmp_path / "incumbent")
    assert c.resolve_incumbent.python_func(
        registry=str(tmp_path / "registry"), environment=ENV, incumbent=incumbent
    )
    assert incumbent.metadata["commit"] == sha and registry.is_artifact(Path(incumbent.path))

    # the next run logs with the deployed (trained actors) policy and its exploration
    logs, cem = art(Dataset, tmp_path / "next_logs"), art(Model, tmp_path / "next_cem")
    c.simulate_logs.python_func(
        config="small",
        config_overrides=TINY,
        log_seed=1001,
        logs_uri="",
        incumbent=incumbent,
        logs=logs,
        cem=cem,
    )
    assert logs.metadata["behaviour"] == "deployed-actors" and logs.metadata["seeds"] == [1001]


def test_ingest_refuses_invalid_logs(chain: dict, tmp_path: Path) -> None:
    import shutil

    import pyarrow.parquet as pq

    bad = tmp_path / "bad"
    shutil.copytree(chain["logs"].path, bad)
    table = pq.read_table(bad / "users.parquet")
    pq.write_table(
        table.set_column(1, "activity_group", table["activity_group"].cast("int64")), bad / "users.parquet"
    )
    out = art(Dataset, tmp_path / "out")
    with pytest.raises(LogValidationError, match="activity_group"):
        c.ingest_logs.python_func(
            config="small", config_overrides=TINY, logs_uri=str(bad), simulated=chain["sim_logs"], logs=out
        )
    assert not Path(out.path).exists()


def test_training_set_must_match_the_logs(chain: dict, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    logs = read_logs(Path(chain["logs"].path))
    table = pq.read_table(chain["tset"].path)

    rows, page = logs.transitions.num_rows, logs.config.cascade.page_size
    precheck_training_set(Path(chain["tset"].path), rows, page)

    def refused(bad: pa.Table, match: str, in_footer: bool = False) -> None:
        """``in_footer``: the pre-check a run makes before CEM tuning refuses it too, from the footer alone."""
        path = tmp_path / "bad.parquet"
        pq.write_table(bad, path)
        with pytest.raises(TrainingSetMismatch, match=match):
            verify_training_set(path, logs)
        if in_footer:
            with pytest.raises(TrainingSetMismatch, match=match):
                precheck_training_set(path, rows, page)
        else:
            precheck_training_set(path, rows, page)

    refused(table.slice(1), "rows for", in_footer=True)
    refused(table.replace_schema_metadata({}), "feature_service", in_footer=True)
    refused(
        table.drop_columns(["user_behaviour__click_rate"]),
        r"missing columns \['user_behaviour__click_rate'\]",
        in_footer=True,
    )
    # a column twice: the footer check names it; pyarrow itself refuses to read such a table, naming it too
    pq.write_table(table.append_column("user_id", table["user_id"]), tmp_path / "twice.parquet")
    with pytest.raises(TrainingSetMismatch, match=r"columns \['user_id'\] appear more than once"):
        precheck_training_set(tmp_path / "twice.parquet", rows, page)
    with pytest.raises(TrainingSetMismatch, match=r"not a readable Parquet file: Multiple matches .*user_id"):
        verify_training_set(tmp_path / "twice.parquet", logs)
    column = table.schema.get_field_index("user_behaviour__requests")
    refused(
        table.set_column(column, "user_behaviour__requests", table[column].cast(pa.float64())),
        "'user_behaviour__requests' is double, expected int64",
        in_footer=True,
    )
    # another user on row 2, and a NaN among row 3's shown items' features: each named with its row
    users = table["user_id"].to_numpy().copy()
    users[2] += 1
    refused(
        table.set_column(table.schema.get_field_index("user_id"), "user_id", pa.array(users)),
        r"'user_id' differs .* at rows \[2\] \(logged request ids \[\d+\]",
    )
    column = table.schema.get_field_index("item_stats__view_rate")
    flat = pc.list_flatten(table[column].combine_chunks())  # nulls: items without stats yet, and allowed
    missing = flat.is_null().to_numpy(zero_copy_only=False).copy()
    rates = flat.fill_null(0.0).to_numpy(zero_copy_only=False).copy()
    rates[3 * page + 1], missing[3 * page + 1] = np.nan, False
    refused(
        table.set_column(
            column,
            "item_stats__view_rate",
            pa.FixedSizeListArray.from_arrays(pa.array(rates, mask=missing), page),
        ),
        r"'item_stats__view_rate' holds NaN or infinite values at rows \[3\]",
    )


def test_bad_parameters_are_clear(tmp_path: Path) -> None:
    from unexrl.pipeline import steps

    with pytest.raises(FileNotFoundError, match="not a YAML path, nor one of the bundled"):
        steps.resolve_config("nonexistent")
    with pytest.raises(FileNotFoundError, match="no file"):
        steps.resolve_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ValueError, match="held-out"):
        from unexrl.pipeline.evaluation import evaluate_release

        evaluate_release(
            steps.resolve_config("small"),
            candidate=tmp_path,
            cem=tmp_path,
            incumbent=None,
            out=tmp_path / "e",
            seeds=[1000],
        )
    paths = {"logs": tmp_path, "training_set": tmp_path, "cem": tmp_path, "out": tmp_path}
    multi_node = {"algo": "td3", "train_nodes": 2, "train_workers": 1}
    with pytest.raises(ValueError, match="train_job_kind 'mpijob'"):
        steps.train(steps.resolve_config("small"), **paths, **multi_node, train_job_kind="mpijob")
    with pytest.raises(ValueError, match="multi-node job needs train_image and data_pvc"):
        steps.train(steps.resolve_config("small"), **paths, **multi_node)


def test_multi_node_path_runs_the_rendered_job_command(
    chain: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """nodes > 1: inputs are staged on the shared volume and the job's own arguments are run; here the 'cluster'
    runs them with one local process instead of submitting (the submission itself is not exercised)."""
    from unexrl.pipeline import launcher, steps

    ran = {}

    def run_job_here(kind: str, spec: launcher.JobSpec, **_kw) -> dict:
        manifest = launcher.render(kind, spec)
        ran["manifest"] = manifest
        args = manifest["spec"]["trainer"]["args"]
        launcher.run_checked(launcher.torchrun_command(1, args), Path(args[args.index("--out") + 1]))
        return {}

    monkeypatch.setattr(launcher, "submit_and_wait", run_job_here)
    out = tmp_path / "model"
    summary = steps.train(
        steps.resolve_config("small", TINY),
        logs=Path(chain["logs"].path),
        training_set=Path(chain["tset"].path),
        cem=Path(chain["cem"].path),
        out=out,
        algo="unexrl-cic",
        train_nodes=2,
        train_workers=1,
        train_job_kind="trainjob",
        train_image="img",
        data_pvc="unexrl-data",
        mount_path=str(tmp_path / "pvc"),
        gpu_type="amd.com/gpu",
        job_name="unexrl-train-test",
    )
    shared = tmp_path / "pvc" / "unexrl-runs" / "unexrl-train-test"
    assert ran["manifest"]["spec"]["trainer"]["numNodes"] == 2
    # the pipeline's gpu_type reaches the job's pods, not only the train task
    assert ran["manifest"]["spec"]["trainer"]["resourcesPerNode"] == {"limits": {"amd.com/gpu": 1}}
    assert all(str(shared) in a for a in ran["manifest"]["spec"]["trainer"]["args"] if a.startswith("/"))
    assert (shared / "inputs" / "logs" / "manifest.json").is_file() and (
        shared / "run" / "curve.json"
    ).is_file()
    assert summary.updates == 4 and (out / "manifest.json").is_file()
