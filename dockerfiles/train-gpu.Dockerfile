# unexrl-train-gpu: the train step and the multi-node TrainJob / PyTorchJob workers (torchrun, NCCL, one process
# per GPU with device=cuda). The GPU stack is the combination checked on an H200 (stack.md): torch 2.11 (CUDA 12.8
# wheels here), TorchRec 1.6.1, FBGEMM-GPU 1.6.0. The core's torch==2.13.0 pin is for CPU machines, so the project
# is installed without dependencies and its other requirements are listed explicitly.
#   docker build -f dockerfiles/train-gpu.Dockerfile -t ghcr.io/unexrl/unexrl-train-gpu:0.1.0 .
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
RUN apt-get update && apt-get install -y --no-install-recommends python3.12 python3.12-venv git ca-certificates \
 && rm -rf /var/lib/apt/lists/* && python3.12 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1 PYTHONPATH=/app
WORKDIR /app
RUN pip install torch==2.11.0 --index-url https://download.pytorch.org/whl/cu128 \
 && pip install fbgemm-gpu==1.6.0 --index-url https://download.pytorch.org/whl/cu128 \
 && pip install tensordict==0.15.3 torchmetrics==1.0.3 pyre-extensions==0.0.32 iopath pyvers \
 && pip install --no-deps torchrec==1.6.1
RUN pip install "numpy>=1.26,<3" "pyarrow>=16,<22" "pydantic>=2.7,<3" "pyyaml>=6,<7" "tqdm>=4.66,<5" \
    "matplotlib>=3.8,<4" "safetensors>=0.4" "feast[redis,duckdb]==0.67.0" kfp==2.17.3 kfp-kubernetes==2.17.3 \
    "ruamel.yaml>=0.18,<0.19"
COPY pyproject.toml README.md ./
COPY unexrl/ unexrl/
RUN pip install --no-deps .
COPY configs/ configs/
COPY feature_repo/ feature_repo/
COPY components/ components/
COPY pipelines/ pipelines/
RUN python -c "import unexrl.train.job, unexrl.pipeline.launcher, torchrec"
