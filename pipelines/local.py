"""Run `unexrl_continuous_training` on this machine with kfp.local (what `make run` does).

    python -m pipelines.local --config configs/default.yaml --out runs/default [--set key=value ...] [--iterations N]

Every task runs as a subprocess of this Python (SubprocessRunner, use_venv=False: no per-task installs), artifacts
under <out>/kfp/. The terminal gets one line per task as it starts and finishes, a progress bar for training and a
closing summary; kfp.local's own output (every task's log, its input and output dumps) goes to
<out>/logs/pipeline-<time>.log (pipelines/console.py). The GitOps repository is a bare git repository at <out>/manifests.git, seeded once from the
project's k8s/ tree; the model registry is <out>/registry; the Feast registry for serving is published to
<out>/feast/registry.db; the BentoML store is <out>/bentoml. Cluster settings
(GPUs, node selectors, tolerations, PVCs) are ignored by kfp.local, with a warning.

The continuous loop: the registry outlives a run, so the next run into the same <out> logs under the policy the last
one deployed and evaluates its candidate against it. ``--iterations N`` runs that loop N times (iteration i logs on
seeds.train[i mod len]) and writes <out>/iterations.json, .md and .png: the uplift of each iteration's candidate over
its incumbent and over CEM.
"""

import argparse
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipelines.console import console

ROOT = Path(__file__).resolve().parents[1]


def run_local(config: str, out: Path, overrides: list[str] | None = None, **params: Any) -> dict[str, Any]:
    """Run the pipeline locally; return where everything is (report, model, bento, gate decision, deploy commit)."""
    from kfp import local

    from pipelines.continuous_training import unexrl_continuous_training
    from unexrl.pipeline.release import init_manifests_repo

    out = Path(out).resolve()
    (out / "tmp").mkdir(parents=True, exist_ok=True)
    os.environ["TMPDIR"] = str(out / "tmp")  # every task makes a temporary directory
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    if "gitops_repo" not in params:
        params["gitops_repo"] = str(init_manifests_repo(out / "manifests.git", ROOT / "k8s"))
    config_path = Path(config)
    if config_path.suffix in (".yaml", ".yml"):
        config = str(config_path.resolve())
    params = {
        "registry": str(out / "registry"),
        "serving_registry": str(out / "feast" / "registry.db"),
        "bentoml_home": str(out / "bentoml"),
        **params,
    }
    root = out / "kfp"
    before = set(root.glob("*")) if root.is_dir() else set()
    log = out / "logs" / f"pipeline-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.log"
    print(f"pipeline unexrl-continuous-training: config {config}, out {out}\n  kfp.local's log: {log}")
    started = time.perf_counter()
    with console(log):
        local.init(
            runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True
        )
        unexrl_continuous_training(config=config, config_overrides=list(overrides or []), **params)
    seconds = time.perf_counter() - started
    runs = sorted(set(root.glob("*")) - before)
    if len(runs) != 1:
        raise RuntimeError(f"expected one new run under {root}, found {runs}")
    return locate(runs[0], seconds, params["gitops_repo"], params.get("gitops_branch", "main")) | {
        "log": str(log)
    }


def locate(run: Path, seconds: float, repo: str, branch: str) -> dict[str, Any]:
    """Where a finished local run put its report, model, bento, decision and deploy commit (None when gated out),
    and the uplifts the gate read."""
    from unexrl.contracts import files
    from unexrl.contracts.evaluation import EvaluationSummary, GateDecision
    from unexrl.contracts.release import BentoRecord

    decision = GateDecision.read(run / "gate" / "decision")
    deploy_out = run / "deploy" / "executor_output.json"
    commit = json.loads(deploy_out.read_text())["parameterValues"]["Output"] if deploy_out.is_file() else None
    bento = run / "package" / "bento" / files.BENTO
    evaluation = run / "evaluate" / "evaluation"
    summary = EvaluationSummary.read(evaluation / files.SUMMARY)
    return {
        "run": str(run),
        "seconds": round(seconds, 1),
        "report": str(run / "evaluate" / "report"),
        "evaluation": str(evaluation / files.SUMMARY),
        "plot": str(evaluation / files.EVALUATION_PLOT),
        "incumbent": summary.incumbent.name,
        "uplift_vs_incumbent_pct": summary.uplift_vs_incumbent_pct.as_dict(),
        "uplift_vs_cem_pct": summary.uplift_vs_cem_pct.as_dict(),
        "model": str(run / "train" / "model"),
        "gate": {
            "passed": decision.passed,
            "reasons": decision.reasons,
            "decision": str(run / "gate" / "decision"),
        },
        "bento": BentoRecord.read(bento).model_dump(mode="json") if bento.is_file() else None,
        "deploy": {"commit": commit, "repo": repo, "branch": branch} if commit else None,
    }


def run_iterations(
    config: str, out: Path, iterations: int, overrides: list[str] | None = None, **params: Any
) -> list[dict[str, Any]]:
    """``iterations`` pipeline runs into ``out``, each logging under the last deployment; returns one row each."""
    from unexrl.io import atomic_write_text
    from unexrl.pipeline import registry
    from unexrl.pipeline.steps import resolve_config

    train_seeds = resolve_config(config, overrides or []).seeds.train
    registry_root = Path(params.get("registry", Path(out).resolve() / "registry"))
    environment = params.get("environment", "staging")
    rows = []
    for i in range(iterations):
        before = registry.deployed(registry_root, environment)  # the incumbent this iteration logs under
        result = run_local(
            config, out, overrides, **{"log_seed": train_seeds[i % len(train_seeds)], **params}
        )
        rows.append(
            {
                "iteration": i + 1,
                "log_seed": train_seeds[i % len(train_seeds)],
                "seconds": result["seconds"],
                "incumbent": before.model_version if before else "CEM (first release)",
                "uplift_vs_incumbent_pct": result["uplift_vs_incumbent_pct"],
                "uplift_vs_cem_pct": result["uplift_vs_cem_pct"],
                "gate_passed": result["gate"]["passed"],
                "model_version": result["bento"]["model_version"] if result["bento"] else None,
                "bento": result["bento"]["bento_tag"] if result["bento"] else None,
                "commit": result["deploy"]["commit"] if result["deploy"] else None,
                "run": result["run"],
            }
        )
        print("\n".join(summary_lines(result)))
        # after every iteration: a loop stopped by a failed run keeps the rows of the runs before it
        atomic_write_text(Path(out) / "iterations.json", json.dumps(rows, indent=2))
        atomic_write_text(Path(out) / "iterations.md", iterations_markdown(rows))
        plot_iterations(rows, Path(out) / "iterations.png")
    return rows


def _pct(e: dict[str, float]) -> str:
    return f"{e['mean']:+.1f}% [{e['low']:+.1f}, {e['high']:+.1f}]"


def iterations_markdown(rows: list[dict[str, Any]]) -> str:
    header = [
        "iteration",
        "log seed",
        "incumbent",
        "uplift vs incumbent",
        "uplift vs CEM",
        "gate",
        "released version",
        "deploy commit",
        "minutes",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        lines.append(
            f"| {r['iteration']} | {r['log_seed']} | {r['incumbent']} | {_pct(r['uplift_vs_incumbent_pct'])} "
            f"| {_pct(r['uplift_vs_cem_pct'])} | {'pass' if r['gate_passed'] else 'refuse'} "
            f"| {r['model_version'] or '-'} | {(r['commit'] or '-')[:12]} | {r['seconds'] / 60:.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot_iterations(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from unexrl.io import write_figure

    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = [r["iteration"] for r in rows]
    for key, label in (
        ("uplift_vs_cem_pct", "candidate vs CEM"),
        ("uplift_vs_incumbent_pct", "candidate vs incumbent"),
    ):
        e = [r[key] for r in rows]
        ax.errorbar(
            x,
            [v["mean"] for v in e],
            yerr=[[v["mean"] - v["low"] for v in e], [v["high"] - v["mean"] for v in e]],
            marker="o",
            capsize=3,
            label=label,
        )
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xticks(x)
    ax.set_xlabel("pipeline iteration (each logs under the last deployment)")
    ax.set_ylabel("watch time / session uplift (%)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    write_figure(fig, path)


def summary_lines(result: dict[str, Any]) -> list[str]:
    """The closing summary: uplift with its CI, the gate's decision and reasons, what was released, where to look."""
    gate = result["gate"]
    lines = [
        f"pipeline finished in {result['seconds']:.0f} s",
        f"  uplift vs {result['incumbent']}: {_pct(result['uplift_vs_incumbent_pct'])} watch time per session "
        + (
            "(95% CI)"
            if result["incumbent"] == "cem"
            else f"(vs CEM {_pct(result['uplift_vs_cem_pct'])}; 95% CIs)"
        ),
        f"  gate:    {'PASS' if gate['passed'] else 'REFUSE: ' + '; '.join(gate['reasons'])}  ({gate['decision']})",
    ]
    if result["bento"]:
        lines += [
            f"  bento:   {result['bento']['bento_tag']} (store {result['bento']['bentoml_home']})",
            (
                f"  deploy:  commit {result['deploy']['commit'][:12]} on {result['deploy']['branch']} of "
                f"{result['deploy']['repo']}"
            ),
        ]
    else:
        lines += ["  bento:   none (gate refused)", "  deploy:  none (gate refused)"]
    return lines + [
        f"  report:  {result['report']} (plot {result['plot']})",
        f"  model:   {result['model']}",
        f"  log:     {result['log']}",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", default="configs/default.yaml", help="config name (small, default) or YAML path"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/pipeline"), help="run directory")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override passed to every step (the pipeline's config_overrides)",
    )
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help="a pipeline parameter, e.g. --param min_uplift_pct=2.0 (value parsed as JSON, else text)",
    )
    parser.add_argument(
        "--iterations",
        type=int,
        default=1,
        help="run the continuous loop this many times, each "
        "logging under the last deployment (default 1); writes <out>/iterations.md/.json/.png",
    )
    args = parser.parse_args(argv)
    params: dict[str, Any] = {}
    for item in args.param:
        name, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--param {item!r}: expected NAME=VALUE")
        try:
            params[name] = json.loads(value)
        except json.JSONDecodeError:
            params[name] = value
    if args.iterations > 1:
        if "log_seed" in params:
            parser.error("--param log_seed with --iterations: each iteration logs on its own training seed")
        rows = run_iterations(args.config, args.out, args.iterations, args.overrides, **params)
        print(f"\n{args.iterations} iterations ({args.out / 'iterations.md'}):\n" + iterations_markdown(rows))
        return 0
    from unexrl.io import atomic_write_text

    result = run_local(args.config, args.out, args.overrides, **params)
    atomic_write_text(args.out / "pipeline.json", json.dumps(result, indent=2))
    print("\n".join(summary_lines(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
