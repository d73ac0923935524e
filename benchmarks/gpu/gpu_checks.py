"""GPU checks: NCCL training under torchrun, the training and simulator benchmarks, and a paper-config run.

Writes OUT/gpu_checks.json after every check (so a check cut short by the machine's time limit leaves the earlier
ones), plus the logs and the paper run's results. Every figure is measured in this run; a check that cannot run
records why instead of a number. Started by benchmarks/gpu/run_gpu_checks.sh, which installs TorchRec first.

The checks, in order of what the docs need most, each bounded by its own timeout and the --budget-s deadline:
  nccl_train    a short unexrl-cic run on configs/small.yaml, tables sharded over NCCL (one rank per GPU)
  bench_train   `unexrl bench train` on configs/paper.yaml (1M item rows): CIC vs CTDE vs raw EBC on the GPU
  bench_sim     `unexrl bench sim` on configs/paper.yaml (2000 -> 500 -> 100 -> 10)
  paper_run     `unexrl experiment` on configs/paper.yaml: CEM, TD3, UNEX-RL-CTDE and -CIC, one training seed, a budget
                that fits the lease (PAPER_RUN), evaluated on seeds.evaluation
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CUDA = ["--set", "device=cuda"]
SMALL = ["--config", "configs/small.yaml", *CUDA]
PAPER = ["--config", "configs/paper.yaml", *CUDA]
TRAIN = [
    "train.updates=300",
    "train.warmup_sessions=256",
    "train.sessions_per_collect=64",
    "train.updates_per_collect=100",
    "train.eval_every=300",
    "train.eval_sessions=200",
    "train.checkpoint_every=150",
    "algo.batch_size=256",
]
PAPER_RUN = [
    "experiment.variants=[cem,td3,unexrl-ctde,unexrl-cic]",
    "experiment.agents_seeds=0",
    "experiment.eval_sessions_per_seed=2000",
    "cem.iterations=10",
    "train.updates=1500",
    "train.eval_every=250",
    "train.eval_sessions=1000",
    "train.warmup_sessions=1024",
    "train.sessions_per_collect=128",
    "train.updates_per_collect=50",
]
"""the paper-config run's budget: the paper's sizes, a training budget that fits a few minutes of one GPU"""
RUN_DIR = Path("/tmp/unexrl-gpu-run")  # checkpoints are deeper than what comes back from OUT
PAPER_DIR = Path("/tmp/unexrl-gpu-paper")


def _sets(overrides: list[str]) -> list[str]:
    return [x for o in overrides for x in ("--set", o)]


def _run(
    cmd: list[str], out: Path, name: str, timeout: float
) -> tuple[subprocess.CompletedProcess[str] | None, float]:
    """Run a command from the repo root with its output in OUT/<name>.log; None when it ran past ``timeout``."""
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        log = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        proc, log = None, f"{e.stdout or ''}{e.stderr or ''}\nTIMEOUT after {timeout:.0f} s"
    (out / f"{name}.log").write_text(log if isinstance(log, str) else log.decode(errors="replace"))
    return proc, round(time.perf_counter() - started, 2)


def environment() -> dict[str, Any]:
    import torch

    versions = {}
    for name in ("torch", "torchrec", "fbgemm-gpu", "tensordict", "pydantic", "safetensors", "pyarrow"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    cuda = torch.cuda.is_available()
    return {
        "python": sys.version.split()[0],
        "versions": versions,
        "cuda": cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
    }


def nccl_train(out: Path, gpus: int, timeout: float) -> dict[str, Any]:
    """A short unexrl-cic run on the small config, tables sharded over NCCL; its curve, export and timings."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(gpus),
        "-m",
        "unexrl",
        "--",
        "train",
        *SMALL,
        *_sets(TRAIN),
        "--algo",
        "unexrl-cic",
        "--out",
        str(RUN_DIR),
    ]
    proc, wall = _run(cmd, out, "nccl_train", timeout)
    log = (out / "nccl_train.log").read_text()
    result: dict[str, Any] = {
        "command": " ".join(cmd[1:]),
        "returncode": proc.returncode if proc else None,
        "wall_s": wall,
        "backend_nccl": "backend=nccl" in log,
    }
    if not (RUN_DIR / "curve.json").is_file():
        return result | {"error": "no curve.json written; see nccl_train.log"}
    from unexrl.policies.artifact import read_manifest

    curve = json.loads((RUN_DIR / "curve.json").read_text())
    manifest = read_manifest(RUN_DIR / "export")  # verifies every file's sha256
    return result | {
        "updates": curve["updates"],
        "train_seconds": curve["seconds"],
        "updates_per_s": curve["updates_per_s"],
        "final_validation_watch_time": curve["final_validation_watch_time"],
        "checkpoint_save_s": [float(s) for s in re.findall(r"checkpoint saved .* seconds=([0-9.]+)", log)],
        "sharding": manifest["training"]["sharding"],
        "export_files": manifest["files"],
    }


def bench(kind: str, out: Path, timeout: float) -> dict[str, Any]:
    """`unexrl bench <kind>` on the paper config, on the GPU."""
    path = out / f"bench_{kind}.json"
    proc, wall = _run(
        [sys.executable, "-m", "unexrl", "bench", kind, *PAPER, "--json", str(path)],
        out,
        f"bench_{kind}",
        timeout,
    )
    if proc is None or proc.returncode != 0 or not path.is_file():
        return {
            "returncode": proc.returncode if proc else None,
            "wall_s": wall,
            "error": (out / f"bench_{kind}.log").read_text()[-3000:],
        }
    return json.loads(path.read_text()) | {"wall_s": wall}


def paper_run(out: Path, timeout: float) -> dict[str, Any]:
    """CEM, TD3 and UNEX-RL-CIC on configs/paper.yaml, one training seed; results.md/json and plots into OUT."""
    cmd = [
        sys.executable,
        "-m",
        "unexrl",
        "experiment",
        *PAPER,
        *_sets(PAPER_RUN),
        "--seeds",
        "1",
        "--out",
        str(PAPER_DIR),
    ]
    proc, wall = _run(cmd, out, "paper_run", timeout)
    finished = sorted(p.stem for p in (PAPER_DIR / "runs").glob("*.json"))
    result: dict[str, Any] = {
        "command": " ".join(cmd[1:]),
        "returncode": proc.returncode if proc else None,
        "wall_s": wall,
        "finished_runs": finished,
    }
    for name in ("results.json", "results.md", "learning_curves.png"):
        if (PAPER_DIR / name).is_file():
            shutil.copy(PAPER_DIR / name, out / f"paper_{name}")
    if not (PAPER_DIR / "results.json").is_file():
        return result | {"error": "no results.json; see paper_run.log"}
    return result | {"results": json.loads((PAPER_DIR / "results.json").read_text())}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--budget-s", type=float, default=540, help="stop starting checks after this many seconds"
    )
    parser.add_argument(
        "--checks", nargs="+", help="run only these checks (a paper_run resumes its finished runs)"
    )
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget_s
    report: dict[str, Any] = {"environment": environment()}
    gpus = len(report["environment"]["gpus"])

    def save() -> None:
        (out / "gpu_checks.json").write_text(json.dumps(report, indent=2))

    checks: list[tuple[str, float, Callable[[float], dict[str, Any]]]] = [
        ("nccl_train", 120, lambda t: nccl_train(out, gpus, t)),
        ("bench_train", 75, lambda t: bench("train", out, t)),
        ("bench_sim", 40, lambda t: bench("sim", out, t)),
        ("paper_run", 540, lambda t: paper_run(out, t)),
    ]
    if gpus == 0:
        report["error"] = "no CUDA device visible: nothing measured"
    for name, limit, check in checks if gpus else []:
        if args.checks and name not in args.checks:
            continue
        left = deadline - time.monotonic()
        if left < 20:
            report[name] = {"skipped": f"{left:.0f} s left of the --budget-s deadline"}
        else:
            print(f"--- {name} (up to {min(limit, left):.0f} s)", flush=True)
            report[name] = check(min(limit, left))
        save()
    save()
    print(json.dumps({k: v for k, v in report.items() if k != "paper_run"}, indent=2)[:6000])
    return 0 if gpus and all("error" not in v for k, v in report.items() if k != "environment") else 1


if __name__ == "__main__":
    sys.exit(main())
