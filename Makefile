# qe_assets — every target installs what it needs first; a fresh clone needs only python3 and make.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# One stamp per layer, so a later target adds what an earlier one left out: `make demo` needs only
# the core (~0.9 GB); `make test` and `make train` add the test and train extras (torch,
# transformers, trl, peft, playwright: +1.5 GB) to the same venv.
STAMP := $(VENV)/.installed-core
TEST_STAMP := $(VENV)/.installed-test
TRAIN_STAMP := $(VENV)/.installed-train
DEMO_LOOP_EVENTS ?= 200
# The docs extra has its own stamp: mkdocs-material comes from PyPI the first time `make docs` runs.
DOCS_STAMP := $(VENV)/.installed-docs
export QE_DATA_DIR ?= $(CURDIR)/data
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEMO_EVENTS ?= 1500
DEMO_SEED ?= 7
PYTEST_ARGS ?=
# `make test` runs the suite in this many worker processes (pytest-xdist), a test file per worker
# at a time, the longest files first (qe_assets_tests/conftest.py): most tests wait on servers,
# daemons and subprocesses, so two workers on two cores take well under the time of one.
# TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
XDIST := $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)
# The train extra's torch: this machine's wheel mirror holds the CPU build. Elsewhere, set
# TORCH_INDEX=https://download.pytorch.org/whl/cpu for the CPU build (PyPI's pulls ~3 GB of CUDA).
TORCH_INDEX ?=
# DVC for the real `dvc pull` test (qe_assets_tests/test_dvc.py), in a venv of its own: its
# dependency tree (~100 packages) stays out of the project's, and the test finds it by QE_TEST_DVC.
DVC_VENV := .venv-dvc
DVC_STAMP := $(DVC_VENV)/.installed
DVC_VERSION ?= 3.67.1
# Arize Phoenix for the importer's tests and benchmark (qe_assets_tests/test_imports_phoenix.py,
# qe_assets_bench/imports.py), in a venv of its own: it pins graphql-core and protobuf against
# Dagster's (~40 s, ~860 MB). The tests find its `phoenix` by QE_TEST_PHOENIX.
PHOENIX_VENV := .venv-phoenix
PHOENIX_STAMP := $(PHOENIX_VENV)/.installed
PHOENIX_VERSION ?= 20.26.1
PHOENIX_OTEL_VERSION ?= 0.17.2
OPENINFERENCE_SEMCONV_VERSION ?= 0.1.42
# pip's "Location ... is ignored" lines are noise from this machine's mirror config.
PIP_QUIET := 2>&1 | { grep -v '^WARNING: Location' || true; }

.PHONY: help install install-test train system-deps dvc phoenix demo demo-loop docs docs-config test test-fast lint format ui bench clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e . $(PIP_QUIET)
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install -q -e ".[test,train]" $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) \
	  $(PIP_QUIET)
	touch $(TEST_STAMP) $(TRAIN_STAMP)

$(TRAIN_STAMP): $(STAMP)
	$(BIN)/pip install -q -e ".[train]" $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) \
	  $(PIP_QUIET)
	touch $(TRAIN_STAMP)

install: $(STAMP) ## create .venv with the project and its core dependencies (what the demo and the UI need)

install-test: $(TEST_STAMP) ## add the test and train extras (pytest, playwright, torch, trl, ...)

train: $(TRAIN_STAMP) ## add the train extra (torch, transformers, trl, peft) for the TRL fine-tune examples
	@echo "train extra installed; fine-tune with the TRL example:"
	@echo "  export QE_FINETUNE_BACKEND=command QE_TRL_MODEL=<a Hugging Face model id or folder>"
	@echo "  export QE_FINETUNE_COMMAND=\"python examples/finetune_trl_lora.py\"   # python = $(BIN)/python"

$(DOCS_STAMP): $(STAMP)
	$(BIN)/pip install -q -e ".[docs]" $(PIP_QUIET)
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP) ## build the docs site into site/ (mkdocs --strict; fails if docs/configuration.md is stale)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet
	@echo "docs: $(CURDIR)/site/index.html"

docs-config: $(STAMP) ## regenerate docs/configuration.md from qe_assets/settings/ (a test checks it is current)
	$(BIN)/python -m qe_assets.settings.reference --write docs/configuration.md

system-deps: ## install redis-server, chromium, a CJK font and postgresql (apt) when they are missing
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium fonts-liberation"; \
	fc-list :lang=zh 2>/dev/null | grep -q . || missing="$$missing fonts-noto-cjk"; \
	{ command -v initdb || ls /usr/lib/postgresql/*/bin/initdb; } >/dev/null 2>&1 \
	  || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing (apt) ..."; \
	  $(SUDO) apt-get update -qq; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    $$missing >/dev/null; \
	fi

$(DVC_STAMP):
	$(PYTHON) -m venv $(DVC_VENV)
	$(DVC_VENV)/bin/pip install -q 'dvc[s3]==$(DVC_VERSION)' $(PIP_QUIET)
	touch $(DVC_STAMP)

dvc: $(DVC_STAMP) ## install DVC (with S3) into .venv-dvc, for the real `dvc pull` test

$(PHOENIX_STAMP):
	$(PYTHON) -m venv $(PHOENIX_VENV)
	$(PHOENIX_VENV)/bin/pip install -q 'arize-phoenix==$(PHOENIX_VERSION)' \
	  'arize-phoenix-otel==$(PHOENIX_OTEL_VERSION)' \
	  'openinference-semantic-conventions==$(OPENINFERENCE_SEMCONV_VERSION)' $(PIP_QUIET)
	touch $(PHOENIX_STAMP)

phoenix: $(PHOENIX_STAMP) ## install Arize Phoenix into .venv-phoenix, for the importer's tests and bench

demo: $(STAMP) ## generate demo events into the inbox and run the whole graph offline
	$(BIN)/python -m qe_assets.ops.demo --count $(DEMO_EVENTS) --seed $(DEMO_SEED) --bad-share 0.01 \
	  --out "$(QE_DATA_DIR)/inbox/demo-seed$(DEMO_SEED).jsonl"
	$(BIN)/qe run --cut-version
	$(BIN)/qe status
	@echo; echo "datasets:  $(QE_DATA_DIR)/datasets/"; ls -1 "$(QE_DATA_DIR)/datasets/" | sed 's/^/  /'
	@echo "database:  $(QE_DATA_DIR)/qe.duckdb   (query it: .venv/bin/qe sql \"SELECT ...\")"
	@echo "review:    .venv/bin/qe review list"
	@echo "UI:        make ui   → http://127.0.0.1:3000 (Dagster), http://127.0.0.1:8787 (review)"

demo-loop: $(TRAIN_STAMP) ## two rounds of the loop offline on a tiny local model: train, serve, judge, promote, route (CPU)
	$(BIN)/python -m qe_assets.testing.demo_loop --events $(DEMO_LOOP_EVENTS)

test: $(TEST_STAMP) system-deps $(DVC_STAMP) $(PHOENIX_STAMP) docs ## install everything the tests need, build the docs, run the whole suite
	$(BIN)/ruff check qe_assets qe_assets_tests
	QE_TEST_DVC=$(CURDIR)/$(DVC_VENV)/bin/dvc QE_TEST_PHOENIX=$(CURDIR)/$(PHOENIX_VENV)/bin/phoenix \
	  $(BIN)/python -m pytest $(XDIST) $(PYTEST_ARGS)

test-fast: $(TEST_STAMP) ## the suite without slow trials and real training (`train` marker)
	$(BIN)/python -m pytest -m "not slow and not train" $(XDIST) $(PYTEST_ARGS)

lint: $(TEST_STAMP) ## ruff check and format check, and the layout's import contracts
	$(BIN)/ruff check qe_assets qe_assets_tests
	$(BIN)/ruff format --check qe_assets qe_assets_tests
	$(BIN)/lint-imports

format: $(TEST_STAMP) ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix qe_assets qe_assets_tests
	$(BIN)/ruff format qe_assets qe_assets_tests

bench: $(TEST_STAMP) $(PHOENIX_STAMP) ## benchmarks: the pipeline vs a reference and one-pass anchors, LLM throughput, rollout, dashboards, review page, Phoenix import, local evaluation vs transformers serve, training wrapper overhead
	$(BIN)/python -m qe_assets_bench.pipeline $(BENCH_ARGS)
	$(BIN)/python -m qe_assets_bench.llm_throughput
	$(BIN)/python -m qe_assets_bench.rollout
	$(BIN)/python -m qe_assets_bench.dashboards
	$(BIN)/python -m qe_assets_bench.review_page
	QE_TEST_PHOENIX=$(CURDIR)/$(PHOENIX_VENV)/bin/phoenix $(BIN)/python -m qe_assets_bench.imports
	$(BIN)/python -m qe_assets_bench.local_eval
	$(BIN)/python -m qe_assets_bench.training_overhead

ui: $(STAMP) ## dagster dev on 127.0.0.1:3000 (DAGSTER_HOME under QE_DATA_DIR) + review page on :8787
	$(BIN)/qe ui

clean: ## remove runtime state under data/ (keeps data/README.md)
	find "$(QE_DATA_DIR)" -mindepth 1 ! -name README.md ! -name .gitkeep -delete
