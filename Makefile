# Two entry points (see README): `make run` runs the main job, `make test` runs the tests.
# Both create or reuse .venv and install what they need; nothing relies on a pre-built environment.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
CONFIG ?= configs/default.yaml
OUT ?= runs/pipeline
CHECKOV_VENV ?= .venv-checkov
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha256sum | cut -c1-16)

.PHONY: run test install bench clean redis-server prometheus

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade "pip>=24"
	# torch first (its CPU wheel is on local disk here; the pin is pyproject's), then the project with every
	# extra, then pyproject's [tool.unexrl] no-deps (TorchRec without its CUDA fbgemm-gpu dependency).
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[dev]"
	$(PIP) install --no-deps $$($(PY) -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["tool"]["unexrl"]["no-deps"])')
	# checkov (policy scan of k8s/, tests/test_k8s_checkov.py) in its own venv: it would downgrade packaging,
	# networkx, python-dateutil, importlib-metadata and tabulate in this one.
	test -x $(CHECKOV_VENV)/bin/python || $(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip --disable-pip-version-check -q install checkov==3.3.30
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

# The continuous-training pipeline under kfp.local (pipelines/local.py): simulate -> features -> training set ->
# train (torchrun, 2 CPU processes) -> evaluate -> gate -> package -> deploy into $(OUT)/manifests.git.
# RUN_ARGS: more options, e.g. RUN_ARGS="--set train.updates=500 --param min_uplift_pct=2.0".
run: $(STAMP)
	PYTHONPATH=$(CURDIR) OMP_NUM_THREADS=1 $(PY) -m pipelines.local --config $(CONFIG) --out $(OUT) $(RUN_ARGS)

# Lint first (seconds): ruff's rules and its formatting, as configured in pyproject.toml.
test: $(STAMP) redis-server prometheus
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q

# The feature store's Redis tests start their own redis-server on loopback: install it where missing (CI runs
# as root on Debian). Where it cannot be installed, those tests are skipped and say why.
redis-server:
	@command -v redis-server >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends redis-server >/dev/null) || \
		echo "make: redis-server could not be installed; the Redis feature-store tests will be skipped"

# The serving tests start a real Prometheus, tests/test_k8s.py checks rules with its promtool, and
# `unexrl bench serve` drives load with wrk: install Debian's packages where missing (CI runs as root on Debian).
# Where that is impossible, those tests are skipped and say why.
prometheus:
	@(command -v prometheus && command -v promtool && command -v wrk) >/dev/null || (apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus wrk >/dev/null) || \
		echo "make: prometheus/wrk could not be installed; the Prometheus serving test and bench serve will be skipped"

bench: $(STAMP)
	$(PY) -m unexrl bench sim --config $(CONFIG) --json

clean:
	rm -rf $(VENV) $(CHECKOV_VENV) runs .pytest_cache
