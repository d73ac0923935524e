"""Run `unexrl_continuous_training` on this machine with kfp.local (what `make run` does).

    python -m pipelines.local --config configs/default.yaml --out runs/default [--set key=value ...]

Every task runs as a subprocess of this Python (SubprocessRunner, use_venv=False: no per-task installs), artifacts
under <out>/kfp/. The GitOps repository is a bare git repository at <out>/manifests.git, seeded once from the
project's k8s/ tree; the model registry is <out>/registry; the BentoML store is <out>/bentoml. Cluster settings
(GPUs, node selectors, tolerations, PVCs) are ignored by kfp.local, with a warning.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

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
    params = {"registry": str(out / "registry"), "bentoml_home": str(out / "bentoml"), **params}
    root = out / "kfp"
    before = set(root.glob("*")) if root.is_dir() else set()
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    started = time.perf_counter()
    unexrl_continuous_training(config=config, config_overrides=list(overrides or []), **params)
    seconds = time.perf_counter() - started
    runs = sorted(set(root.glob("*")) - before)
    if len(runs) != 1:
        raise RuntimeError(f"expected one new run under {root}, found {runs}")
    return locate(runs[0], seconds, params["gitops_repo"], params.get("gitops_branch", "main"))


def locate(run: Path, seconds: float, repo: str, branch: str) -> dict[str, Any]:
    """Where a finished local run put its report, model, bento, decision and deploy commit (None when gated out)."""
    decision = json.loads((run / "gate" / "decision").read_text())
    deploy_out = run / "deploy" / "executor_output.json"
    commit = json.loads(deploy_out.read_text())["parameterValues"]["Output"] if deploy_out.is_file() else None
    bento = run / "package" / "bento" / "bento.json"
    return {
        "run": str(run),
        "seconds": round(seconds, 1),
        "report": str(run / "evaluate" / "report"),
        "evaluation": str(run / "evaluate" / "evaluation" / "summary.json"),
        "model": str(run / "train" / "model"),
        "gate": {"passed": decision["passed"], "reasons": decision["reasons"], "decision": str(run / "gate" / "decision")},
        "bento": json.loads(bento.read_text()) if bento.is_file() else None,
        "deploy": {"commit": commit, "repo": repo, "branch": branch} if commit else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/default.yaml", help="config name (small, default) or YAML path")
    parser.add_argument("--out", type=Path, default=Path("runs/pipeline"), help="run directory")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override passed to every step (the pipeline's config_overrides)")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=JSON",
                        help="a pipeline parameter, e.g. --param min_uplift_pct=2.0 (value parsed as JSON, else text)")
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
    result = run_local(args.config, args.out, args.overrides, **params)
    (args.out / "pipeline.json").write_text(json.dumps(result, indent=2))
    print(f"\npipeline finished in {result['seconds']} s (run {result['run']})")
    print(f"  report:  {result['report']}")
    print(f"  model:   {result['model']}")
    print(f"  gate:    {'PASS' if result['gate']['passed'] else 'REFUSE ' + str(result['gate']['reasons'])}"
          f" ({result['gate']['decision']})")
    if result["bento"]:
        print(f"  bento:   {result['bento']['bento_tag']} (store {result['bento']['bentoml_home']})")
        print(f"  deploy:  commit {result['deploy']['commit']} on {result['deploy']['branch']} of {result['deploy']['repo']}")
    else:
        print("  bento:   none (gate refused)\n  deploy:  none (gate refused)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
