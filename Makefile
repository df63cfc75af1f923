# prefopt: `make train` runs the embedded default, `make test` the test suite; both install first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= outputs/reproduce
LOGGER ?= none

.PHONY: install test lint format train reproduce clean

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

clean:
	rm -rf outputs multirun wandb .pytest_cache
