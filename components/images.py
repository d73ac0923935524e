"""Container images per role (Dockerfiles in dockerfiles/). Tags follow the package version; override the registry
with UNEXRL_IMAGE_REGISTRY when compiling for another registry."""

import os

REGISTRY = os.environ.get("UNEXRL_IMAGE_REGISTRY", "ghcr.io/unexrl")
VERSION = "0.1.0"
CPU_IMAGE = f"{REGISTRY}/unexrl-cpu:{VERSION}"  # dockerfiles/cpu.Dockerfile: simulate, features, evaluate, gate, deploy
TRAIN_GPU_IMAGE = f"{REGISTRY}/unexrl-train-gpu:{VERSION}"  # dockerfiles/train-gpu.Dockerfile: CUDA torch + TorchRec + fbgemm-gpu
SERVING_IMAGE = (
    f"{REGISTRY}/unexrl-serving:{VERSION}"  # dockerfiles/serving.Dockerfile: bentoml build (package step)
)
