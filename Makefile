# chexops: `make repro` runs the default pipeline, `make test` the test suite, on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.chexops-installed
# Stage commands (`chexops ...`) and dvc come from the venv.
RUN := PATH="$(abspath $(BIN)):$$PATH"
PORT ?= 5000
# pytest workers (pytest-xdist). Every test trains with one torch thread, so one worker per core;
# the end-to-end tests that share one built pipeline stay on one worker (--dist loadgroup).
TEST_WORKERS ?= 2
PYTEST := $(RUN) $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

.PHONY: setup repro test test-fast lint ui bench

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,auc]'
	touch $(STAMP)

repro: setup
	$(RUN) dvc repro

test: setup lint
	$(PYTEST)

lint: setup
	$(BIN)/ruff check src benchmarks tests
	$(BIN)/mypy

test-fast: setup
	$(PYTEST) -m "not slow"

ui: setup
	$(RUN) chexops ui --port $(PORT)

bench: setup
	$(RUN) $(BIN)/python benchmarks/data_bench.py --scale chexpert
	$(RUN) $(BIN)/python benchmarks/train_bench.py
	$(RUN) $(BIN)/python benchmarks/loader_bench.py
	$(RUN) $(BIN)/python benchmarks/dvc_bench.py
	$(RUN) $(BIN)/python benchmarks/fingerprint_bench.py
	$(RUN) $(BIN)/python benchmarks/pipeline_bench.py
	$(RUN) $(BIN)/python benchmarks/stats_bench.py
