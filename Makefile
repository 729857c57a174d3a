# flwr-kd: every target creates .venv when missing (plain venv + pip: torch comes from local disk).
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
EXTRAS  ?= dev,cloud,track
LINT_PATHS := flwr_kd tests benchmarks cloud examples
export FLWR_TELEMETRY_ENABLED = 0
# checkov lives in its own venv: in .venv it would downgrade packages torch needs, and its
# bc-python-hcl2 collides with python-hcl2. Pinned so new upstream checks cannot turn CI red.
CHECKOV_VENV    ?= .venv-checkov
CHECKOV_VERSION ?= 3.3.30
CHECKOV_STAMP   := $(CHECKOV_VENV)/.installed
# The MLflow tracking server for tests/test_tracking.py, in its own venv for the same reason:
# full mlflow would downgrade pyarrow, gunicorn and python-dateutil in .venv.
MLFLOW_VENV    ?= .venv-mlflow
MLFLOW_VERSION ?= 3.17.2
MLFLOW_STAMP   := $(MLFLOW_VENV)/.installed

.PHONY: demo test venvs lint bench bench-quick fashion-mnist clean gpu-check

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $(STAMP)

# The two tool venvs hold no torch, so uv (installed in .venv with flwr) builds them: it
# downloads in parallel and installs in seconds where pip takes minutes.
UV := $(VENV)/bin/uv

$(CHECKOV_STAMP): $(STAMP)
	$(UV) venv --quiet --allow-existing --python python3 $(CHECKOV_VENV)
	$(UV) pip install --quiet --python $(CHECKOV_VENV)/bin/python 'checkov==$(CHECKOV_VERSION)'
	touch $(CHECKOV_STAMP)

$(MLFLOW_STAMP): $(STAMP)
	$(UV) venv --quiet --allow-existing --python python3 $(MLFLOW_VENV)
	$(UV) pip install --quiet --python $(MLFLOW_VENV)/bin/python 'mlflow==$(MLFLOW_VERSION)'
	touch $(MLFLOW_STAMP)

## FedDF on the embedded digits dataset: 8 clients, 3 architectures, alpha 0.5, 5 rounds.
demo: $(STAMP)
	$(VENV)/bin/flwr-kd simulate --strategy feddf --dataset digits --clients 8 --alpha 0.5 \
		--rounds 5 --out runs/demo

## The whole test suite (starts and stops what it needs itself), on two workers, one test module
## per worker at a time (most of the time goes to waiting on the processes the tests start).
test: venvs lint
	CHECKOV=$(CURDIR)/$(CHECKOV_VENV)/bin/checkov \
		MLFLOW_SERVER_CLI=$(CURDIR)/$(MLFLOW_VENV)/bin/mlflow $(PY) -m pytest -q -n 2 --dist loadfile

## The three environments: .venv with pip (torch from local disk), then the tool venvs with uv.
venvs:
	$(MAKE) -j3 $(STAMP) $(CHECKOV_STAMP) $(MLFLOW_STAMP)

## ruff (pinned in the dev extra): lint and formatting, also run by `make test`.
lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)

clean:
	rm -rf runs .pytest_cache

## Benchmarks (results and REPORT.md under benchmarks/); Fashion-MNIST comes from Debian.
## The study's runs in-process, BENCH_WORKERS side by side: how the committed results were made.
BENCH_WORKERS ?= 2
bench: $(STAMP) fashion-mnist
	$(PY) benchmarks/run.py --mode full --engine inprocess --workers $(BENCH_WORKERS)
	$(PY) benchmarks/pooled.py

bench-quick: $(STAMP) fashion-mnist
	$(PY) benchmarks/run.py --mode quick --engine inprocess --workers $(BENCH_WORKERS)

fashion-mnist:
	@test -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz || \
		{ [ "$$(id -u)" = 0 ] && apt-get install -y dataset-fashion-mnist; } || \
		{ echo "Fashion-MNIST missing: sudo apt-get install dataset-fashion-mnist"; exit 1; }

## A short FedDF on an NVIDIA GPU (about a minute): fails unless training, logits, distillation
## and evaluation all ran on the GPU, and prints samples/s next to the same run on the CPU.
## Without CUDA it exits 2: "no CUDA device: make gpu-check needs an NVIDIA GPU".
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py
