# qe_assets — every target installs what it needs first; a fresh clone needs only python3 and make.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The docs extra has its own stamp: `make install` needs only the local wheel mirror, while
# mkdocs-material comes from PyPI the first time `make docs` runs.
DOCS_STAMP := $(VENV)/.docs-installed
export QE_DATA_DIR ?= $(CURDIR)/data
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEMO_EVENTS ?= 3000
DEMO_SEED ?= 7
PYTEST_ARGS ?=
# The train extra's torch: this machine's wheel mirror holds the CPU build. Elsewhere, set
# TORCH_INDEX=https://download.pytorch.org/whl/cpu for the CPU build (PyPI's pulls ~3 GB of CUDA).
TORCH_INDEX ?=

.PHONY: help install system-deps demo docs test test-fast lint format ui bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# pip's "Location ... is ignored" lines are noise from this machine's mirror config.
	$(BIN)/pip install -q -e ".[test,train]" $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) \
	  2>&1 | { grep -v '^WARNING: Location' || true; }
	touch $(STAMP)

install: $(STAMP) ## create .venv and install the project with its test and train extras

$(DOCS_STAMP): $(STAMP)
	$(BIN)/pip install -q -e ".[docs]" 2>&1 | { grep -v '^WARNING: Location' || true; }
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP) ## build the docs site into site/ (mkdocs --strict; configuration generated from settings.py)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet
	@echo "docs: $(CURDIR)/site/index.html"

system-deps: ## install redis-server, chromium and postgresql (apt) when they are missing
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium fonts-liberation"; \
	{ command -v initdb || ls /usr/lib/postgresql/*/bin/initdb; } >/dev/null 2>&1 \
	  || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing (apt) ..."; \
	  $(SUDO) apt-get update -qq; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    $$missing >/dev/null; \
	fi

demo: install ## generate demo events into the inbox and run the whole graph offline
	$(BIN)/python -m qe_assets.ops.demo --count $(DEMO_EVENTS) --seed $(DEMO_SEED) --bad-share 0.01 \
	  --out "$(QE_DATA_DIR)/inbox/demo-seed$(DEMO_SEED).jsonl"
	$(BIN)/qe run --cut-version
	$(BIN)/qe status
	@echo; echo "datasets:  $(QE_DATA_DIR)/datasets/"; ls -1 "$(QE_DATA_DIR)/datasets/" | sed 's/^/  /'
	@echo "database:  $(QE_DATA_DIR)/qe.duckdb   (query it: .venv/bin/qe sql \"SELECT ...\")"
	@echo "review:    .venv/bin/qe review list"
	@echo "UI:        make ui   → http://127.0.0.1:3000 (Dagster), http://127.0.0.1:8787 (review)"

test: install system-deps docs ## install everything the tests need, build the docs, run the whole suite
	$(BIN)/ruff check qe_assets qe_assets_tests
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: install ## the suite without slow trials and real training (`train` marker)
	$(BIN)/python -m pytest -m "not slow and not train" $(PYTEST_ARGS)

lint: install ## ruff check and format check
	$(BIN)/ruff check qe_assets qe_assets_tests
	$(BIN)/ruff format --check qe_assets qe_assets_tests

format: install ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix qe_assets qe_assets_tests
	$(BIN)/ruff format qe_assets qe_assets_tests

bench: install ## benchmarks: the pipeline vs a reference and one-pass anchors, LLM throughput, rollout, dashboards, review page
	$(BIN)/python -m qe_assets_bench.pipeline $(BENCH_ARGS)
	$(BIN)/python -m qe_assets_bench.llm_throughput
	$(BIN)/python -m qe_assets_bench.rollout
	$(BIN)/python -m qe_assets_bench.dashboards
	$(BIN)/python -m qe_assets_bench.review_page

ui: install ## dagster dev on 127.0.0.1:3000 (DAGSTER_HOME under $(QE_DATA_DIR)) + review page on :8787
	$(BIN)/qe ui

clean: ## remove runtime state under data/ (keeps data/README.md)
	find "$(QE_DATA_DIR)" -mindepth 1 ! -name README.md ! -name .gitkeep -delete
