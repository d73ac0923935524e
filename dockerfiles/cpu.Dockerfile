# unexrl-cpu: the pipeline's CPU steps (resolve incumbent, simulate/ingest logs, features, training set, evaluate,
# gate, deploy). CPU torch + TorchRec (fbgemm-gpu-cpu), Feast, kfp, git for the GitOps commit.
#   docker build -f dockerfiles/cpu.Dockerfile -t ghcr.io/unexrl/unexrl-cpu:0.1.0 .
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends git ca-certificates && rm -rf /var/lib/apt/lists/*
WORKDIR /app
ENV PIP_NO_CACHE_DIR=1 PYTHONPATH=/app OMP_NUM_THREADS=1
# Install order matters (../shared/design/stack.md): torch first, TorchRec without its CUDA fbgemm-gpu dependency.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install fbgemm-gpu-cpu==1.8.0 tensordict==0.15.3 torchmetrics==1.0.3 pyre-extensions==0.0.32 iopath \
 && pip install --no-deps torchrec==1.8.0
COPY pyproject.toml README.md ./
COPY unexrl/ unexrl/
RUN pip install ".[train,features,pipelines]"
COPY configs/ configs/
COPY feature_repo/ feature_repo/
COPY components/ components/
COPY pipelines/ pipelines/
RUN python -c "import unexrl.pipeline.steps, torchrec, feast, kfp"
