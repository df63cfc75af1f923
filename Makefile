# prefopt: `make train` runs the embedded default, `make test` the test suite; both install first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= outputs/reproduce
LOGGER ?= none

.PHONY: install test lint format train reproduce bench clean

$(BIN)/prefopt: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0  # the CPU build; an unpinned torch would pull a CUDA build
	$(BIN)/pip install -q -e ".[dev]"
	touch $(BIN)/prefopt

install: $(BIN)/prefopt

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

train: install
	$(BIN)/prefopt train $(ARGS)

reproduce: install
	$(BIN)/python -m prefopt.research.reproduce --out $(OUT) logger=$(LOGGER)

# prefopt against TRL's DPOTrainer (benchmarks/dpo_throughput.py; ARGS="--steps 10 --repeats 1" for a quick
# look), in its own venv with the `bench` extra so .venv keeps no trl; CPU here, the 1B shape on a GPU.
BENCH_VENV ?= .venv-bench

$(BENCH_VENV)/bin/trl: pyproject.toml
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q --upgrade pip
	$(BENCH_VENV)/bin/pip install -q torch==2.13.0
	$(BENCH_VENV)/bin/pip install -q -e ".[dev,bench]"
	touch $(BENCH_VENV)/bin/trl

bench: $(BENCH_VENV)/bin/trl
	$(BENCH_VENV)/bin/python benchmarks/dpo_throughput.py $(ARGS)

clean:
	rm -rf outputs multirun wandb .pytest_cache
