# unexrl-serving (pipeline role): the package step, `bentoml build` of serving/ around the candidate, offline.
# The image that serves traffic is built from the Bento itself (`bentoml containerize unexrl-serving:<version>`,
# in CI where Docker runs) and tagged with the Bento version the deploy step writes into the overlay.
#   docker build -f dockerfiles/serving.Dockerfile -t ghcr.io/unexrl/unexrl-serving:0.1.0 .
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends git ca-certificates && rm -rf /var/lib/apt/lists/*
WORKDIR /app
# The package step builds the Bento from this source tree (its build context: serving/, unexrl/, feature_repo/,
# pyproject.toml), so the tree stays on PYTHONPATH here; dependencies come from pyproject.toml as in cpu.Dockerfile.
ENV PIP_NO_CACHE_DIR=1 PYTHONPATH=/app OMP_NUM_THREADS=1
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY configs/ configs/
COPY feature_repo/ feature_repo/
COPY k8s/monitoring/ k8s/monitoring/
COPY k8s/base/training/ k8s/base/training/
COPY unexrl/ unexrl/
RUN pip install ".[train,features,serve,pipelines]" && pip install --no-deps $(python -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["tool"]["unexrl"]["no-deps"])')
COPY serving/ serving/
COPY components/ components/
RUN python -c "import unexrl.serve.package, bentoml, torchrec"
