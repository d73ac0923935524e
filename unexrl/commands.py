"""What each `unexrl` subcommand does, as plain functions of (config, parsed arguments)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from unexrl.artifacts import load_any_policy
from unexrl.bench.sim import bench_sim, format_bench
from unexrl.config import Config
from unexrl.contracts import files
from unexrl.contracts.logs import LogManifest
from unexrl.evaluate.evaluation import evaluate_policies
from unexrl.features import store as feature_store
from unexrl.features.bench import bench_features as _bench_features
from unexrl.features.bench import format_bench as format_bench_features
from unexrl.features.build import build_features
from unexrl.io import atomic_write_text
from unexrl.policies.artifact import load_policy, save_weight_policy
from unexrl.policies.baselines import tune_baseline, tune_baselines
from unexrl.policies.cem import tune_cem
from unexrl.policies.weights import RandomPolicy, WeightPolicy, greedy_weights
from unexrl.sim.env import Policy, Simulator
from unexrl.simulate import behaviour_policy, simulate_logs

__all__ = [
    "bench_features",
    "bench_sim",
    "cem",
    "diagnose",
    "evaluate",
    "experiment",
    "features",
    "format_bench",
    "format_bench_features",
    "run",
    "simulate",
    "traffic",
    "train",
]

log = logging.getLogger("unexrl")


def reference_policies(cfg: Config) -> dict[str, Policy]:
    """Random weights and immediate-greedy weights: the floor every tuned policy must clear."""
    return {
        "random": RandomPolicy(cfg.cascade, seed=0),
        "greedy": WeightPolicy(greedy_weights(cfg.cascade).to(cfg.device), cfg.cascade),
    }


def simulate(cfg: Config, args: argparse.Namespace) -> int:
    sim = Simulator(cfg)
    seed = args.seed if args.seed is not None else cfg.seeds.train[0]
    base = None
    if args.policy is not None:
        base = load_policy(args.policy, cfg)
    elif cfg.logging.kind == "cem":
        log.info("no --policy given: tuning CEM on seeds.train %s first", list(cfg.seeds.train))
        base = tune_cem(sim, cfg.cem, cfg.seeds.train)
    elif cfg.logging.kind == "artifact":
        raise ValueError("logging.kind=artifact needs --policy DIR")
    policy, description = behaviour_policy(sim, base, seed)
    out = simulate_logs(sim, policy, description, args.out, seed)
    manifest = LogManifest.read(out / files.MANIFEST)
    log.info("wrote logs to %s: %s", out, {k: v.rows for k, v in manifest.files.items()})
    return 0


def cem(cfg: Config, args: argparse.Namespace) -> int:
    sim = Simulator(cfg)
    policy = tune_cem(sim, cfg.cem, cfg.seeds.train, group_by=args.group_by)
    save_weight_policy(
        policy, args.out, cfg, algorithm="cem" if args.group_by == "none" else f"cem-{args.group_by}"
    )
    log.info("wrote CEM artifact to %s", args.out)
    return 0


def evaluate(cfg: Config, args: argparse.Namespace) -> int:
    sim = Simulator(cfg)
    policies: dict[str, Policy] = {} if args.no_references else reference_policies(cfg)
    for item in args.policy:
        name, sep, path = item.partition("=")
        if not sep:
            raise ValueError(f"--policy {item!r}: expected NAME=DIR")
        policies[name] = load_any_policy(Path(path), cfg, sim.world)
    cem = None
    for name in dict.fromkeys(
        args.baseline
    ):  # e.g. --baseline cem --baseline group-cem: the table beside CEM
        tuned = tune_baseline(name, sim, cem)
        cem = tuned if name == "cem" else cem
        policies[name] = tuned
    if not policies:
        raise ValueError("nothing to evaluate: give --policy NAME=DIR or drop --no-references")
    seeds = cfg.seeds.evaluation if args.seeds == "evaluation" else cfg.seeds.validation
    report = evaluate_policies(sim, policies, seeds=seeds, reference=args.reference)
    report.write(args.json, args.md, args.png)
    print(report.to_markdown())
    return 0


def run(cfg: Config, args: argparse.Namespace) -> int:
    """The main job: baselines -> logs -> held-out evaluation -> report."""
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    sim = Simulator(cfg)
    log.info(
        "config=%s world: %d users, %d items; cascade %s",
        cfg.name,
        sim.world.n_users,
        sim.world.n_items,
        cfg.cascade.sizes,
    )

    baselines = tune_baselines(sim)
    for name, policy in baselines.items():
        save_weight_policy(policy, out / "artifacts" / name, cfg, algorithm=name, overwrite=True)
    tuned_s = time.perf_counter() - started

    seed = cfg.seeds.train[0]
    policy, description = behaviour_policy(sim, baselines["cem"], seed)
    logs = out / "logs"
    simulate_logs(sim, policy, description, logs, seed, overwrite=True)

    policies: dict[str, Policy] = {**reference_policies(cfg), **baselines}
    report = evaluate_policies(sim, policies)
    report.write(out / "evaluation.json", out / "evaluation.md", out / "evaluation.png")
    summary: dict[str, Any] = {
        "config": cfg.name,
        "seconds": {"tuning": round(tuned_s, 1), "total": round(time.perf_counter() - started, 1)},
        "evaluation": report.to_dict(),
        "artifacts": {name: str(out / "artifacts" / name) for name in baselines},
        "logs": str(logs),
    }
    atomic_write_text(out / "report.json", json.dumps(summary, indent=2))
    atomic_write_text(out / "report.md", _report_markdown(cfg, report.to_markdown(), summary))
    print(report.to_markdown())
    log.info("report: %s (%.0f s)", out / "report.md", summary["seconds"]["total"])
    return 0


def _report_markdown(cfg: Config, table: str, summary: dict[str, Any]) -> str:
    return "\n".join(
        [
            f"# UNEX-RL run report: config `{cfg.name}`",
            "",
            (
                f"World: {cfg.world.n_users} users, {cfg.world.n_items} items, {cfg.world.n_categories} categories; "
                f"cascade {' -> '.join(str(s) for s in cfg.cascade.sizes)} "
                f"({', '.join(s.name for s in cfg.cascade.stages)})."
            ),
            "",
            "## Held-out evaluation",
            "",
            table,
            "",
            "![evaluation](evaluation.png)",
            "",
            (
                "Policies: `random` and `greedy` (maximise predicted immediate watch time) are references; `cem` is the "
                "production baseline (global weights tuned by CEM on training seeds); the `oracle-*` policies know each "
                "user's hidden type (not deployable) and bound what fixed per-group weights can reach; `popular-matching` "
                "fixes the matching stage to popularity and re-tunes the rest."
            ),
            "",
            (
                f"Logs for training: `{summary['logs']}`. Time: {summary['seconds']['total']} s "
                f"(baseline tuning {summary['seconds']['tuning']} s)."
            ),
            "",
        ]
    )


def features(cfg: Config, args: argparse.Namespace) -> int:
    """`unexrl features init | build | materialize | training-set`: a repository; logs -> feature tables -> Feast
    -> training set."""
    if args.features_command == "init":
        log.info(
            "created the Feast repository %s from the package's template", feature_store.init_repo(args.repo)
        )
        return 0
    if args.features_command == "build":  # needs no Feast
        manifest = build_features(args.logs, args.out, cfg, overwrite=args.overwrite)
        log.info("wrote features to %s: %s", args.out, {k: v.rows for k, v in manifest.tables.items()})
        return 0
    from feast.errors import FeastError

    try:
        if args.features_command == "materialize":
            log.info("materialised %s", feature_store.materialize(cfg, args.features))
        else:
            target, table = feature_store.training_set(cfg, args.logs, args.out)
            log.info(
                "wrote the training set (%d requests, %d columns) to %s",
                table.num_rows,
                table.num_columns,
                target,
            )
    except FeastError as err:
        raise ValueError(
            f"feature store: {err} (has `unexrl features materialize` run for this environment?)"
        ) from err
    return 0


def bench_features(cfg: Config, args: argparse.Namespace) -> dict[str, Any]:
    return _bench_features(cfg, logs=args.logs, redis=args.redis)


def experiment(cfg: Config, args: argparse.Namespace) -> int:
    from unexrl.experiment import results_markdown, run_experiment

    if args.seeds is not None:
        cfg = cfg.model_copy(update={"experiment": cfg.experiment.model_copy(update={"seeds": args.seeds})})
    results = run_experiment(cfg, args.out)
    print(results_markdown(results))
    log.info("results: %s", args.out / "results.md")
    return 0


def train(cfg: Config, args: argparse.Namespace) -> int:
    """`unexrl train`: the same call in one process and on every rank under torchrun (unexrl/train/job.py)."""
    from unexrl.train.job import run_training  # TorchRec: imported only for training

    if args.algo:
        cfg = cfg.model_copy(update={"algo": cfg.algo.model_copy(update={"name": args.algo})})
    if args.logs:
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"regime": "offline"})})
    run_training(
        cfg, args.out, logs=args.logs, cem=args.cem, resume=args.resume, training_set=args.training_set
    )
    return 0


def diagnose(cfg: Config, args: argparse.Namespace) -> int:
    """`unexrl diagnose --run DIR`: the run's critic against the simulator's truth (unexrl/train/diagnose.py)."""
    from unexrl.rl.diagnostics import diagnostics_markdown
    from unexrl.train.diagnose import diagnose_run

    result = diagnose_run(cfg, args.run)
    print(diagnostics_markdown(result, [t.name for t in cfg.world.user_types]))
    log.info("wrote %s (.json, .md, .png)", args.run / "diagnostics")
    return 0


def keys(cfg: Config, args: argparse.Namespace) -> int:
    """`unexrl keys --out DIR`: a signing key pair (unexrl/contracts/signing.py)."""
    from unexrl.contracts.signing import generate_keys

    if (args.out / "private.pem").exists():
        raise FileExistsError(f"{args.out / 'private.pem'} exists; not replacing a signing key")
    private, public = generate_keys(args.out)
    log.info("wrote %s (keep secret) and %s", private, public)
    return 0


def traffic(cfg: Config, args: argparse.Namespace) -> int:
    from unexrl.serve.gateway import ENV_TOKEN_FILE, api_token
    from unexrl.serve.local import bentoml_home
    from unexrl.serve.traffic import run_traffic

    environ = {ENV_TOKEN_FILE: str(args.token_file)} if args.token_file else dict(os.environ)
    token = api_token(environ, Path(bentoml_home()))
    report = run_traffic(
        cfg, args.url, token, sessions=args.sessions, seconds=args.seconds, concurrency=args.concurrency
    )
    text = json.dumps(report.to_dict(), indent=2)
    if args.json and args.json != "-":
        atomic_write_text(Path(args.json), text + "\n")
    print(
        text
        if args.json
        else f"{report.sessions_ended}/{report.sessions_started} sessions ended, "
        f"{report.requests} pages, {report.errors} errors, {report.watch_time_s:.0f} s watched in {report.seconds:.1f} s"
    )
    return 1 if report.errors else 0
