# unexrl-serving (pipeline role): the package step, `bentoml build` of serving/ around the candidate, offline.
# The image that serves traffic is built from the Bento itself (`bentoml containerize unexrl-serving:<version>`,
# in CI where Docker runs) and tagged with the Bento version the deploy step writes into the overlay.
#   docker build -f dockerfiles/serving.Dockerfile -t ghcr.io/unexrl/unexrl-serving:0.1.0 .
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends git ca-certificates && rm -rf /var/lib/apt/lists/*
WORKDIR /app
ENV PIP_NO_CACHE_DIR=1 PYTHONPATH=/app OMP_NUM_THREADS=1
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install fbgemm-gpu-cpu==1.8.0 tensordict==0.15.3 torchmetrics==1.0.3 pyre-extensions==0.0.32 iopath \
 && pip install --no-deps torchrec==1.8.0
COPY pyproject.toml README.md ./
COPY unexrl/ unexrl/
RUN pip install ".[train,features,serve,pipelines]"
COPY configs/ configs/
COPY feature_repo/ feature_repo/
COPY serving/ serving/
COPY components/ components/
RUN python -c "import unexrl.serve.package, bentoml"
