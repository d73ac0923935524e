#!/usr/bin/env bash
# Run after the Bento's requirements are installed (its image's post command, and the test that builds a venv
# from the Bento): the packages pyproject.toml installs without their declared dependencies, [tool.unexrl]
# no-deps (TorchRec: its CUDA fbgemm-gpu dependency is provided by fbgemm-gpu-cpu on CPU images).
set -euo pipefail
pyproject="${BENTO_PATH:-.}/src/pyproject.toml"
read -r -a packages <<< "$(python -c 'import sys, tomllib; print(" ".join(tomllib.load(open(sys.argv[1], "rb"))["tool"]["unexrl"]["no-deps"]))' "$pyproject")"
if command -v uv > /dev/null; then
    uv pip install --python "$(command -v python)" --no-deps "${packages[@]}"
else
    python -m pip install --no-deps "${packages[@]}"
fi
