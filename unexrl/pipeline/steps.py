"""One function per pipeline step: what each KFP component calls, paths and plain values in, typed contracts out.

Every step resolves the same configuration from (config name or path, overrides), so a pipeline parameter means
the same thing to every task.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from unexrl.bundle import config_file
from unexrl.config import Config, load_config
from unexrl.contracts import files
from unexrl.contracts.evaluation import EvaluationSummary, GateDecision
from unexrl.contracts.logs import FeatureManifest, LogManifest
from unexrl.contracts.training import TrainingSummary
from unexrl.io import atomic_directory, atomic_write_text
from unexrl.pipeline.launcher import RUNTIME_GPU_RESOURCE

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"


def resolve_config(config: str, config_overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """``config``: a bundled config's name (``small``, ``default``, ``paper``) or a YAML path; ``config_overrides``:
    --set items."""
    if not config:
        raise ValueError("config: give a config name (small, default, paper) or a path to a YAML file")
    path = config_file(config)
    if not path.is_file():
        raise FileNotFoundError(f"config {config!r}: no file {path}")
    return load_config(path, [str(o) for o in config_overrides])


def write_config(cfg: Config, path: Path) -> Path:
    """The resolved config as YAML (what a subprocess or a remote job is started with)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, yaml.safe_dump(json.loads(json.dumps(cfg.to_dict())), sort_keys=False))
    return path


# -- 1. logs ---------------------------------------------------------------------------------------------------


def tune_cem_artifact(cfg: Config, out: Path, sim: Any = None) -> Any:
    """CEM tuned on seeds.train (the production baseline), saved as a weights artifact at ``out``; returns it."""
    from unexrl.policies.artifact import save_weight_policy
    from unexrl.policies.cem import tune_cem
    from unexrl.sim.env import Simulator

    cem = tune_cem(sim or Simulator(cfg), cfg.cem, cfg.seeds.train)
    save_weight_policy(cem, out, cfg, algorithm="cem", overwrite=True)
    return cem


def simulate_logs(
    cfg: Config, *, logs_out: Path, cem_out: Path, incumbent: Path, log_seed: int = -1, logs_uri: str = ""
) -> LogManifest | None:
    """Tune CEM (the baseline, saved to ``cem_out``), then log sessions under the deployed policy (``incumbent``:
    the resolved incumbent directory, empty on a first release: CEM), with the configured exploration, on
    ``log_seed`` (-1: the first training seed). With ``logs_uri`` (logs from outside, which ingest_logs takes)
    only CEM is tuned and ``logs_out`` is left empty; returns None then, else the log manifest."""
    from unexrl.artifacts import load_any_policy
    from unexrl.pipeline import registry
    from unexrl.rl.policy import ActorPolicy
    from unexrl.sim.env import Simulator
    from unexrl.simulate import behaviour_policy
    from unexrl.simulate import simulate_logs as write_logs

    sim = Simulator(cfg)
    cem = tune_cem_artifact(cfg, cem_out, sim)
    if logs_uri:
        logs_out.mkdir(parents=True, exist_ok=True)
        return None
    seed = cfg.seeds.train[0] if log_seed < 0 else log_seed
    deployed = incumbent if registry.is_artifact(incumbent) else None
    base = load_any_policy(deployed, cfg, sim.world) if deployed is not None else cem
    if isinstance(base, ActorPolicy):  # a deployed RL policy explores with its own keyed noise
        base.explore_std, base.seed = cfg.logging.exploration_std, seed
        policy, description = (
            base,
            {
                "kind": "deployed-actors",
                "artifact": str(deployed),
                "exploration_std": cfg.logging.exploration_std,
            },
        )
    else:
        policy, description = behaviour_policy(sim, base, seed)
        description["source"] = str(deployed) if deployed is not None else "cem"
    write_logs(sim, policy, description, logs_out, seed, progress=False, overwrite=True)
    return LogManifest.read(logs_out / files.MANIFEST)


def ingest_logs(cfg: Config, *, logs_uri: str, simulated: Path, out: Path) -> LogManifest:
    """Validate the logs at ``logs_uri`` (local path or URI; empty: the ``simulated`` ones) against the log
    contract and ``cfg``, then copy them in. An invalid log raises LogValidationError naming file, column and
    rows; nothing is copied."""
    from unexrl.data import read_logs
    from unexrl.features.storage import local_directory

    with local_directory(logs_uri or simulated) as local:
        read_logs(local, cfg)
        with atomic_directory(out, overwrite=True) as tmp:
            shutil.copytree(local, tmp, dirs_exist_ok=True)
    return LogManifest.read(out / files.MANIFEST)


# -- 2.-3. features ----------------------------------------------------------------------------------------------


def build_features(cfg: Config, logs: Path, out: Path) -> FeatureManifest:
    """Feature tables from the logs (point-in-time stamps; docs/features.md)."""
    from unexrl.features.build import build_features as build

    return build(logs, out, cfg, overwrite=True)


def materialize_features(
    cfg: Config, features: Path, store_out: Path, serving_registry: Path | None = None
) -> dict[str, Any]:
    """A Feast repository for this run at ``store_out`` (definitions + registry + online store), applied over
    ``features`` and materialised. Each run gets its own registry, so runs never race on feature_repo/data; with
    ``serving_registry``, it is then published there for the serving replicas (the ``serving`` environment)."""
    from unexrl.features import store

    repo = store.repo_path(cfg)
    with atomic_directory(store_out, overwrite=True) as tmp:
        shutil.copytree(repo, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("data", "__pycache__"))
    run = with_repo(cfg, store_out)
    result = store.materialize(run, features)
    if serving_registry is not None:
        result["published"] = str(store.publish_registry(run, serving_registry))
    return result


def with_repo(cfg: Config, repo: Path) -> Config:
    """``cfg`` with ``features.repo`` pointing at a run's Feast repository."""
    return cfg.model_copy(
        update={"features": cfg.features.model_copy(update={"repo": str(Path(repo).resolve())})}
    )


def build_training_set(
    cfg: Config, logs: Path, features: Path, feature_store: Path, out: Path
) -> dict[str, Any]:
    """Point-in-time join of every logged request with the training feature service; written to ``out``.

    ``features``: the tables ``feature_store`` was materialised from. Its registry reads them by the path they had
    in that task; a task input of the same artifact has the same path, and the join refuses any other."""
    from unexrl.features import store

    target, table = store.training_set(with_repo(cfg, feature_store), logs, out, features)
    return {"path": target, "rows": table.num_rows, "columns": table.num_columns}


# -- 4. training (local launch; cluster launches are in launcher.py) --------------------------------------------


def training_config(cfg: Config, algo: str) -> Config:
    """``cfg`` for offline training of ``algo`` (the pipeline trains from the logs it just built)."""
    return cfg.model_copy(
        update={
            "algo": cfg.algo.model_copy(update={"name": algo}),
            "train": cfg.train.model_copy(update={"regime": "offline"}),
        }
    )


def train_args(config: Path, logs: Path, training_set: Path, cem: Path, run_dir: Path) -> list[str]:
    """``unexrl train`` arguments: offline from the logs, beside the verified training set, CEM for fixed stages."""
    return [
        "train",
        "--config",
        str(config),
        "--logs",
        str(logs),
        "--training-set",
        str(training_set),
        "--cem",
        str(cem),
        "--out",
        str(run_dir),
    ]


def train(
    cfg: Config,
    *,
    logs: Path,
    training_set: Path,
    cem: Path,
    out: Path,
    algo: str,
    train_nodes: int,
    train_workers: int,
    train_job_kind: str = "trainjob",
    train_image: str = "",
    namespace: str = "kubeflow",
    data_pvc: str = "",
    mount_path: str = "/data",
    gpu_type: str = RUNTIME_GPU_RESOURCE,
    gpu_node_selector: dict[str, str] | None = None,
    gpu_tolerations: list[dict[str, str]] | None = None,
    job_name: str | None = None,
) -> TrainingSummary:
    """Train and publish the export to ``out``; returns curve.json's summary. The keywords are the pipeline's
    parameters of the same names.

    One node: torchrun with ``train_workers`` workers right here (CPU processes over gloo locally; one per GPU
    with device=cuda in a GPU pod). Several nodes: a ``train_job_kind`` (trainjob | pytorchjob) named ``job_name``
    (default: a fresh one) of ``train_nodes`` x ``train_workers`` GPUs running ``train_image`` in ``namespace``,
    over the PVC ``data_pvc`` mounted at ``mount_path``, each pod requesting ``train_workers`` of the accelerator
    resource ``gpu_type``, with the GPU node selector and tolerations; waits for it.
    """
    import uuid

    from unexrl.pipeline import launcher

    cfg = training_config(cfg, algo)
    if train_nodes < 1:
        raise ValueError(f"train_nodes: {train_nodes}, need at least 1")
    if train_nodes == 1:
        with tempfile.TemporaryDirectory(prefix="unexrl-train-") as tmp:
            run_dir = Path(tmp) / "run"
            args = train_args(write_config(cfg, Path(tmp) / CONFIG_FILE), logs, training_set, cem, run_dir)
            launcher.run_checked(launcher.torchrun_command(train_workers, args), run_dir)
            summary = launcher.check_complete(run_dir, cfg)
            with atomic_directory(out, overwrite=True) as publish:
                shutil.copytree(run_dir / "export", publish, dirs_exist_ok=True)
        return summary
    if train_job_kind not in launcher.JOB_KINDS:
        raise ValueError(f"train_job_kind {train_job_kind!r}: expected one of {launcher.JOB_KINDS}")
    if not (train_image and data_pvc):
        raise ValueError(f"train_nodes={train_nodes}: a multi-node job needs train_image and data_pvc")
    name = job_name or f"unexrl-train-{uuid.uuid4().hex[:8]}"
    shared = Path(mount_path) / "unexrl-runs" / name
    staged = launcher.stage_inputs(
        {"logs": logs, "training_features.parquet": training_set, "cem": cem}, shared
    )
    config = write_config(cfg, shared / "inputs" / CONFIG_FILE)
    run_dir = launcher.prepare_run_dir(shared / "run")
    args = train_args(config, staged["logs"], staged["training_features.parquet"], staged["cem"], run_dir)
    spec = launcher.JobSpec(
        name=name,
        namespace=namespace,
        image=train_image,
        args=args,
        nodes=train_nodes,
        gpus_per_node=train_workers,
        pvc=data_pvc,
        mount_path=mount_path,
        gpu_resource=gpu_type,
        node_selector=dict(gpu_node_selector or {}),
        tolerations=list(gpu_tolerations or []),
    )
    return launcher.train_on_cluster(cfg, kind=train_job_kind, job=spec, run_dir=run_dir, out=out)


# -- 5. evaluate and gate --------------------------------------------------------------------------------------


def evaluate(
    cfg: Config, *, candidate: Path, cem: Path, incumbent: Path, out: Path, seeds: list[int]
) -> EvaluationSummary:
    """The release evaluation into ``out`` (summary.json, report.md, evaluation.png); ``incumbent``: the resolved
    incumbent directory, empty on a first release (CEM stands in); ``seeds`` empty: the config's evaluation seeds."""
    from unexrl.pipeline import registry
    from unexrl.pipeline.evaluation import evaluate_release

    return evaluate_release(
        cfg,
        candidate=candidate,
        cem=cem,
        incumbent=incumbent if registry.is_artifact(incumbent) else None,
        out=out,
        seeds=seeds,
    )


def evaluation_metrics(summary: EvaluationSummary) -> dict[str, float]:
    """The figures the Kubeflow UI shows for the evaluation task (its Metrics artifact)."""
    up = summary.uplift_vs_incumbent_pct
    return {
        **{f"{name}_watch_time_s": p.watch_time.mean for name, p in summary.policies.items()},
        "uplift_vs_incumbent_pct_mean": up.mean,
        "uplift_vs_incumbent_pct_low": up.low,
        "uplift_vs_incumbent_pct_high": up.high,
        "uplift_vs_cem_pct": summary.uplift_vs_cem_pct.mean,
        "latency_p99_ms": summary.latency.p99_ms,
    }


def gate(
    evaluation: Path, *, min_uplift_pct: float, latency_budget_ms: float, decision_out: Path, report_out: Path
) -> GateDecision:
    """Decide on the summary in ``evaluation`` (refused, naming the field, if it is not a valid summary); write the
    decision to ``decision_out`` and its Markdown to ``report_out``."""
    from unexrl.pipeline.gate import decide, markdown

    summary = EvaluationSummary.read(evaluation / files.SUMMARY)
    decision = decide(summary, min_uplift_pct=min_uplift_pct, latency_budget_ms=latency_budget_ms)
    decision.write(decision_out)
    atomic_write_text(report_out, markdown(decision))
    return decision
