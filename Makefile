# Two commands do everything: `make repro` (set up + run the pipeline) and `make test`.
# Each creates .venv and installs what is missing; nothing else to install by hand.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
# torch goes in first, pinned, so the range in pyproject.toml is already satisfied and pip never
# resolves a multi-GB CUDA build on a CPU machine. On a GPU machine pass your CUDA wheel index:
# make setup TORCH_ARGS="--index-url <pytorch CUDA wheel index>".
TORCH ?= torch==2.13.0
TORCH_ARGS ?=
STAMP := $(VENV)/.installed

# Stage commands (`python -m stages.x`) and tools resolve inside the venv.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
export GX_ANALYTICS_ENABLED := False
export BENTOML_DO_NOT_TRACK := True
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: setup repro test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q $(TORCH_ARGS) "$(TORCH)"
	$(VENV)/bin/python -m pip install -q -e ".[dev]"
	touch $@

repro: setup
	dvc repro

test: setup
	HF_HUB_OFFLINE=1 python -m pytest -q

lint: setup
	ruff check lmforge stages tests benchmarks bento data/sample

bench: setup
	python -m benchmarks.bench_data_stages

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
