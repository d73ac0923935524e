"""GPU checks: `unexrl train` over NCCL under torchrun (one rank per visible GPU) and `unexrl bench train`.

Writes OUT/gpu_checks.json (and the training log). Every figure is measured in this run; a check that cannot run
records why instead of a number. Started by benchmarks/gpu/run_gpu_checks.sh, which installs TorchRec first.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--config", "configs/small.yaml", "--set", "device=cuda"]
TRAIN = ["train.updates=300", "train.warmup_sessions=256", "train.sessions_per_collect=64",
         "train.updates_per_collect=100", "train.eval_every=300", "train.eval_sessions=200", "train.checkpoint_every=150",
         "algo.batch_size=256"]
RUN_DIR = Path("/tmp/unexrl-gpu-run")  # checkpoints are deeper than what comes back from OUT


def environment() -> dict[str, Any]:
    import torch

    versions = {}
    for name in ("torch", "torchrec", "fbgemm-gpu", "tensordict", "pydantic", "safetensors", "pyarrow"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    cuda = torch.cuda.is_available()
    return {"python": sys.version.split()[0], "versions": versions, "cuda": cuda,
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []}


def nccl_train(out: Path, gpus: int) -> dict[str, Any]:
    """A short unexrl-cic run on the small config, tables sharded over NCCL; its curve, export and timings."""
    sets = [x for o in TRAIN for x in ("--set", o)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus), "-m", "unexrl",
           "--", "train", *SMALL, *sets, "--algo", "unexrl-cic", "--out", str(RUN_DIR)]
    started = time.perf_counter()
    proc = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=480)
    log = proc.stdout + proc.stderr
    (out / "nccl_train.log").write_text(log)
    result: dict[str, Any] = {"command": " ".join(cmd[1:]), "returncode": proc.returncode,
                              "wall_s": round(time.perf_counter() - started, 2), "backend_nccl": "backend=nccl" in log}
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


def bench_train(out: Path) -> dict[str, Any]:
    """`unexrl bench train` on the GPU, when this checkout has the command."""
    base = [sys.executable, "-m", "unexrl", "bench", "train"]
    if subprocess.run([*base, "--help"], check=False, cwd=ROOT, capture_output=True).returncode != 0:
        return {"skipped": "`unexrl bench train` does not exist in this checkout"}
    path = out / "bench_train.json"
    proc = subprocess.run([*base, *SMALL, "--json", str(path)], check=False, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    if proc.returncode != 0:
        return {"returncode": proc.returncode, "error": (proc.stdout + proc.stderr)[-3000:]}
    return json.loads(path.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    out = parser.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"environment": environment()}
    gpus = len(report["environment"]["gpus"])
    if gpus == 0:
        report["error"] = "no CUDA device visible: nothing measured"
    else:
        report["nccl_train"] = nccl_train(out, gpus)
        report["bench_train"] = bench_train(out)
    (out / "gpu_checks.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0 if gpus and "error" not in report["nccl_train"] else 1


if __name__ == "__main__":
    sys.exit(main())
