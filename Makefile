# `make repro` sets up .venv and runs the pipeline on the default (chat) data;
# `make test` runs the tests. PYTHON=/path/to/python reuses an existing environment.
PYTHON ?= .venv/bin/python
BIN := $(dir $(PYTHON))
# Stage commands call `python`: put the environment's interpreter first on PATH.
export PATH := $(abspath $(BIN)):$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: install repro test bench loadtest ui params serve clean

.venv/bin/python:
	python3 -m venv .venv

# Python caches the bytecode of each module it imports, as it does by default, even where
# PYTHONDONTWRITEBYTECODE is set (as on CI): otherwise every process of the pipeline and of the tests
# would compile torch, pandas, mlflow and dvc again. So pip installs without compiling, and each module
# is compiled once, by the first process that imports it: most of the environment's files (the
# packages' test suites and optional parts) are never imported at all.
unexport PYTHONDONTWRITEBYTECODE

install: $(PYTHON)
	$(PYTHON) -m pip install -q --no-compile -r requirements.txt
	$(PYTHON) -m pip install -q --no-deps --no-build-isolation -e .

repro: install
	$(PYTHON) -m dvc repro

# Two pytest workers, one test file each at a time (a file's module fixtures stay in one worker):
# CI has two cores. TEST_WORKERS=0 runs everything in this process. One torch thread per process:
# the tests' models are small, and two workers with a thread per core each would fight over the cores.
TEST_WORKERS ?= 2
test: install
	OMP_NUM_THREADS=1 $(PYTHON) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 tests

# The bench trains on the chat windows: build them first (cached after the first time).
bench: install
	$(PYTHON) -m dvc repro window
	$(PYTHON) -m nextword.bench

# The web API of the pipeline's model folder under 32 clients typing at once: one JSON line.
loadtest: install
	$(PYTHON) -m nextword.loadtest

# Rewrite params.yaml from conf/ (the chat preset), as `dvc exp run` does.
params: install
	$(PYTHON) -m nextword.cli params

ui: install
	$(PYTHON) -m mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000

serve: install
	$(PYTHON) -m nextword.cli serve
