#!/usr/bin/env bash
# GPU checks of the training stack (docs/training.md): a short NCCL training under torchrun on one GPU and
# `unexrl bench train` when the command exists, with the figures written to $OUT/gpu_checks.json.
#
# Runs on the CUDA machine (Python 3.12, torch 2.11.0+cu130), from the repository root, in two steps:
#   benchmarks/gpu/run_gpu_checks.sh stage DIR   copy the wheel parts and wheels carried in DIR to /tmp/gpuwheels
#                                                (once per part: ../shared/gpu/prepare-torchrec-wheels.sh splits the
#                                                465 MB fbgemm-gpu wheel into parts of at most 58 MiB)
#   benchmarks/gpu/run_gpu_checks.sh             assemble fbgemm-gpu 1.6.0, install it with torchrec 1.6.1, tensordict,
#                                                pyvers, iopath and any other staged wheel (the image lacks pydantic,
#                                                pydantic-core, annotated-types, typing-inspection) into /tmp/site,
#                                                then run benchmarks/gpu/gpu_checks.py
set -euo pipefail
staged=/tmp/gpuwheels
site=/tmp/site
mkdir -p "$staged"

if [ "${1:-}" = stage ]; then
  cp -v "${2:?usage: $0 stage DIR}"/* "$staged"/
  exit 0
fi

if ! PYTHONPATH=$site python3 -c "import fbgemm_gpu, torchrec" 2>/dev/null; then
  if ls "$staged"/fbgemm.part* >/dev/null 2>&1; then
    cat "$staged"/fbgemm.part* > "$staged"/fbgemm_gpu-1.6.0-cp312-cp312-manylinux_2_28_x86_64.whl
    rm "$staged"/fbgemm.part*
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$staged"/*.whl
fi
export PYTHONPATH=$site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
out=${OUT:-gpu-out}
mkdir -p "$out"
python3 benchmarks/gpu/gpu_checks.py --out "$out" "$@"
