"""The whole pipeline under kfp.local on configs/small.yaml (real tasks, torchrun, Feast, BentoML, git), and a
sabotaged candidate that the gate must refuse.

Passing run: the deployed policy in the registry is the immediate-greedy weights (a weak incumbent, as after a
bad release), so a trained candidate must beat it by the CI and the release reaches a deploy commit. Sabotage run:
the same release wiring (pipelines.continuous_training.release_steps) fed CEM's weights with their sign flipped.
"""

import json
import math
import subprocess
from pathlib import Path

import pytest
import yaml
from kfp import dsl, local
from kfp.dsl import Model, Output

from components import resolve_incumbent
from pipelines.continuous_training import release_steps
from pipelines.local import ROOT, locate, run_local
from unexrl.config import load_config
from unexrl.contracts.artifact import read_artifact
from unexrl.contracts.release import ReleaseRecord
from unexrl.gitops import ANNOTATION
from unexrl.io import sha256_file
from unexrl.pipeline import registry
from unexrl.pipeline.release import init_manifests_repo
from unexrl.policies.artifact import save_weight_policy
from unexrl.policies.weights import WeightPolicy, greedy_weights

FAST = [
    "train.updates=40",
    "train.eval_every=20",
    "train.checkpoint_every=40",
    "evaluation.sessions_per_seed=200",
]
ENV = "staging"


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "--git-dir", str(repo), *args], check=True, capture_output=True, text=True
    ).stdout


def manifests_tree(tmp: Path) -> Path:
    """The project's k8s/ tree when present (merged from the k8s branch), else a minimal overlay."""
    if (ROOT / "k8s" / "overlays" / ENV / "kustomization.yaml").is_file():
        return ROOT / "k8s"
    overlay = tmp / "k8s" / "overlays" / ENV
    overlay.mkdir(parents=True)
    (overlay / "kustomization.yaml").write_text(
        'resources: []\nimages:\n  - name: unexrl-serving\n    newTag: "0.0.0"\ncommonAnnotations: {}\n'
    )
    return tmp / "k8s"


@pytest.fixture(scope="module")
def passed_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("pipeline-pass")
    cfg = load_config(ROOT / "configs" / "small.yaml")
    greedy = save_weight_policy(
        WeightPolicy(greedy_weights(cfg.cascade), cfg.cascade), out / "greedy", cfg, algorithm="greedy"
    )
    version = read_artifact(greedy).version
    registry.register(out / "registry", greedy, ReleaseRecord(environment=ENV, model_version=version))
    repo = init_manifests_repo(out / "manifests.git", manifests_tree(out))
    result = run_local("small", out, FAST, environment=ENV, gitops_repo=str(repo))
    return result | {"repo_path": repo, "out": out}


def test_pipeline_artifacts(passed_run: dict) -> None:
    run = Path(passed_run["run"])
    summary = json.loads(Path(passed_run["evaluation"]).read_text())
    assert set(summary["policies"]) == {"candidate", "incumbent", "cem"}
    for result in summary["policies"].values():
        for metric in ("watch_time", "items", "requests"):
            assert all(math.isfinite(result[metric][k]) for k in ("mean", "low", "high"))
    assert all(math.isfinite(v) for v in summary["uplift_vs_incumbent_pct"].values())
    assert [a["stage"] for a in summary["actions"]] == ["matching", "prerank", "ranking"]
    metrics = json.loads((run / "evaluate" / "executor_output.json").read_text())
    logged = metrics["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    assert {"candidate_watch_time_s", "uplift_vs_incumbent_pct_low", "latency_p99_ms"} <= set(logged)
    assert all(math.isfinite(v) for v in logged.values())
    assert Path(passed_run["report"]).read_text().startswith("# Candidate evaluation")
    log = Path(
        passed_run["log"]
    ).read_text()  # kfp.local's whole output, kept beside the run (pipelines/console.py)
    assert "Executing task" in log and "finished with status" in log and "train unexrl-cic" in log

    # the export names the training set it was trained beside, by hash
    manifest = json.loads((Path(passed_run["model"]) / "manifest.json").read_text())
    tset = run / "build-training-set" / "training_set"
    assert manifest["training_data"]["training_set"]["sha256"] == sha256_file(tset)
    assert manifest["training_data"]["regime"] == "offline" and manifest["training"]["world_size"] == 2


def test_gate_passes_and_deploy_commits(passed_run: dict) -> None:
    decision = json.loads(Path(passed_run["gate"]["decision"]).read_text())
    assert decision["passed"] and passed_run["gate"]["passed"], decision["reasons"]
    commit = passed_run["deploy"]["commit"]
    repo = passed_run["repo_path"]
    assert git(repo, "rev-parse", "main").strip() == commit
    overlay = yaml.safe_load(git(repo, "show", f"{commit}:k8s/overlays/{ENV}/kustomization.yaml"))
    bento = passed_run["bento"]
    assert [i["newTag"] for i in overlay["images"] if i["name"] == "unexrl-serving"] == [bento["image_tag"]]
    assert overlay["commonAnnotations"][ANNOTATION] == bento["model_version"]
    record = registry.deployed(passed_run["out"] / "registry", ENV)
    assert record.commit == commit and record.model_version == bento["model_version"]


@dsl.component
def sabotaged_candidate(config: str, config_overrides: list, cem: Output[Model], candidate: Output[Model]):
    """CEM, and a 'candidate' that is CEM with every weight's sign flipped (ranks by the opposite of each signal)."""
    from pathlib import Path

    from unexrl.pipeline import steps
    from unexrl.policies.artifact import save_weight_policy
    from unexrl.policies.weights import WeightPolicy

    cfg = steps.resolve_config(config, config_overrides)
    tuned = steps.tune_cem_artifact(cfg, Path(cem.path))
    save_weight_policy(
        WeightPolicy(-tuned.weights, cfg.cascade), Path(candidate.path), cfg, algorithm="sabotaged"
    )


@dsl.pipeline
def sabotage_pipeline(
    config: str, config_overrides: list, registry: str, gitops_repo: str, bentoml_home: str
):
    incumbent = resolve_incumbent(registry=registry, environment=ENV)
    bad = sabotaged_candidate(config=config, config_overrides=config_overrides)
    release_steps(
        config=config,
        config_overrides=config_overrides,
        evaluation_seeds=[],
        candidate=bad.outputs["candidate"],
        cem=bad.outputs["cem"],
        incumbent=incumbent.outputs["incumbent"],
        min_uplift_pct=1.0,
        latency_budget_ms=50.0,
        bentoml_home=bentoml_home,
        gitops_repo=gitops_repo,
        environment=ENV,
        gitops_branch="main",
        gitops_secret="unexrl-gitops-token",
        registry=registry,
        data_pvc="unexrl-data",
    )


def test_sabotaged_candidate_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = init_manifests_repo(tmp_path / "manifests.git", manifests_tree(tmp_path))
    seeded = git(repo, "rev-parse", "main").strip()
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(tmp_path / "kfp"),
        raise_on_error=True,
    )
    sabotage_pipeline(
        config="small",
        config_overrides=FAST,
        registry=str(tmp_path / "registry"),
        gitops_repo=str(repo),
        bentoml_home=str(tmp_path / "bentoml"),
    )
    (run,) = (tmp_path / "kfp").iterdir()
    result = locate(run, 0.0, str(repo), "main")
    assert not result["gate"]["passed"]
    assert {"uplift >= 1.0%", "uplift CI lower bound > 0"} <= set(result["gate"]["reasons"])
    summary = json.loads((run / "evaluate" / "evaluation" / "summary.json").read_text())
    assert (
        summary["uplift_vs_incumbent_pct"]["high"] < 0
    )  # the flipped weights are clearly worse, not just noise
    assert result["bento"] is None and result["deploy"] is None
    assert not (run / "package").exists() and not (run / "deploy").exists()
    assert git(repo, "rev-parse", "main").strip() == seeded  # no deploy commit
    assert registry.deployed(tmp_path / "registry", ENV) is None
