# unexrl-train-gpu: the train step and the multi-node TrainJob / PyTorchJob workers (torchrun, NCCL, one process
# per GPU with device=cuda). The GPU stack is the combination checked on an H200 (stack.md): torch 2.11 (CUDA 12.8
# wheels here), TorchRec 1.6.1, FBGEMM-GPU 1.6.0. The core's torch==2.13.0 and fbgemm-gpu-cpu pins are for CPU
# machines, so those three are installed here and the rest of pyproject.toml's requirements are read from it.
#   docker build -f dockerfiles/train-gpu.Dockerfile -t ghcr.io/unexrl/unexrl-train-gpu:0.1.0 .
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
RUN apt-get update && apt-get install -y --no-install-recommends python3.12 python3.12-venv git ca-certificates \
 && rm -rf /var/lib/apt/lists/* && python3.12 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1
WORKDIR /app
RUN pip install torch==2.11.0 --index-url https://download.pytorch.org/whl/cu128 \
 && pip install fbgemm-gpu==1.6.0 --index-url https://download.pytorch.org/whl/cu128 \
 && pip install pyvers \
 && pip install --no-deps torchrec==1.6.1
COPY pyproject.toml README.md ./
COPY configs/ configs/
COPY feature_repo/ feature_repo/
COPY k8s/monitoring/ k8s/monitoring/
COPY k8s/base/training/ k8s/base/training/
COPY unexrl/ unexrl/
# the rest of pyproject.toml's core, train, features and pipelines requirements, less the CPU stack pinned above
RUN python -c 'import re, tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
    reqs = p["dependencies"] + [r for e in ("train", "features", "pipelines") for r in p["optional-dependencies"][e]]; \
    print("\n".join(r for r in reqs if re.match(r"[A-Za-z0-9._-]+", r)[0] not in ("torch", "fbgemm-gpu-cpu")))' \
    > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt && pip install --no-deps .
RUN cd / && python -c "import unexrl.train.job, unexrl.pipeline.launcher, torchrec; from unexrl.pipeline.launcher import runtime_pod_template; runtime_pod_template()"
