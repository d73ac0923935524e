# unexrl-cpu: the pipeline's CPU steps (resolve incumbent, simulate/ingest logs, features, training set, evaluate,
# gate, deploy). CPU torch + TorchRec (fbgemm-gpu-cpu), Feast, kfp, git for the GitOps commit.
#   docker build -f dockerfiles/cpu.Dockerfile -t ghcr.io/unexrl/unexrl-cpu:0.1.0 .
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends git ca-certificates && rm -rf /var/lib/apt/lists/*
WORKDIR /app
ENV PIP_NO_CACHE_DIR=1 OMP_NUM_THREADS=1
# pyproject.toml is the dependency list: torch's CPU wheel first (same pin), then the extras, then its no-deps
# packages (TorchRec without its CUDA fbgemm-gpu dependency). The package is installed, not put on PYTHONPATH: its
# configs, Feast template, monitoring files and training runtime ship inside it (unexrl/bundled links to them in
# the tree; tests/test_installed.py checks that every image copies each link's target).
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY configs/ configs/
COPY feature_repo/ feature_repo/
COPY k8s/monitoring/ k8s/monitoring/
COPY k8s/base/training/ k8s/base/training/
COPY unexrl/ unexrl/
RUN pip install ".[train,features,pipelines]" && pip install --no-deps $(python -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["tool"]["unexrl"]["no-deps"])')
RUN cd / && python -c "import unexrl.pipeline.steps, torchrec, feast, kfp; from unexrl.bundle import config_file, training_runtime_file; assert config_file('small').is_file() and training_runtime_file().is_file()"
