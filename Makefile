# lora-operator: the README's two commands are `make demo` and `make test`.
# Both create/refresh .venv from scratch on a fresh machine (torch pinned to the CPU build
# here, DeepSpeed without build isolation, real kubectl/helm, Debian's prometheus).

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed
TINY_DIR ?= /tmp/lora-operator/tiny
PYTEST_MARKERS ?= not gpu and not lab_full and not chaos_full
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: help setup demo test lint crds crds-check tiny-model lab chaos fuzz clean

help:
	@echo "make demo        set up, then run the main job on the embedded default"
	@echo "make test        set up, then lint + CRD drift check + all tests (not gpu/lab_full/chaos_full)"
	@echo "make lint        ruff, mypy (strict), import-linter, hadolint"
	@echo "make crds        regenerate crds/, docs/api.md, docs/metrics.md, the chart's CRD, README, rules and dashboards"
	@echo "make crds-check  fail if any of those drifted"
	@echo "make tiny-model  regenerate the tiny CPU model and data into $(TINY_DIR)"
	@echo "make lab         the full failure lab (real CPU training; rewrites bench/results/lab.*)"
	@echo "make chaos       the full fault matrix (rewrites the table in docs/reliability.md)"
	@echo "make fuzz        the fuzz tests with 2,000 fresh random examples each"

setup: $(STAMP)

# Order matters: torch first (pinned: an unpinned torch pulls a multi-GB CUDA build), then
# DeepSpeed without build isolation (its build would otherwise pull another torch), then the
# project with every extra, then the real kubectl/helm binaries and promtool.
$(STAMP): pyproject.toml scripts/install-tools.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q torch==$(TORCH_VERSION)
	DS_BUILD_OPS=0 $(PIP) install -q --no-build-isolation deepspeed==0.19.8
	$(PIP) install -q -e ".[operator,trainer,local,report,dev]"
	bash scripts/install-tools.sh $(VENV)
	touch $(STAMP)

tiny-model: setup
	$(PY) -m lora_trainer.tiny --out $(TINY_DIR)

demo: setup tiny-model
	@echo "== 1/2 validating the examples (what kubectl apply would check) =="
	$(BIN)/lora-operator validate examples/*.yaml
	@echo "== 2/2 dev mode: emulated API + pod runner + operator; the quickstart and the collapse demo =="
	rm -rf /tmp/lora-operator/runs/quickstart /tmp/lora-operator/runs/collapse-demo
	$(BIN)/lora-operator dev --exit-when-done --timeout 900 examples/quickstart.yaml examples/collapse-demo.yaml

lint: setup
	$(BIN)/ruff check operator trainer_image tests bench
	$(BIN)/ruff format --check operator trainer_image tests bench
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/hadolint operator/Dockerfile trainer_image/Dockerfile

crds: setup
	$(BIN)/lora-operator crds --dir crds
	$(PY) -m lora_trainer.telemetry.catalog --write docs/metrics.md
	$(PY) -m lora_operator.observability --write
	$(PY) scripts/chart_sync.py

crds-check: setup
	$(BIN)/lora-operator crds --check --dir crds
	$(PY) -m lora_trainer.telemetry.catalog --check docs/metrics.md
	$(PY) -m lora_operator.observability --check
	$(PY) scripts/chart_sync.py --check

test: setup lint crds-check tiny-model
	LORA_OPERATOR_TINY_DIR=$(TINY_DIR) $(PY) -m pytest -m "$(PYTEST_MARKERS)"

# The full failure lab (marker lab_full, excluded from make test): every failure mode and
# healthy variant trained for real on CPU, replayed through the health rules.
lab: setup tiny-model
	LORA_OPERATOR_TINY_DIR=$(TINY_DIR) $(PY) -m pytest -m lab_full tests/lab -p no:cacheprovider

# The full fault matrix (marker chaos_full, excluded from make test); rewrites the table in
# docs/reliability.md from bench/results/chaos.jsonl.
chaos: setup tiny-model
	rm -f bench/results/chaos.jsonl
	status=0; LORA_OPERATOR_TINY_DIR=$(TINY_DIR) LORA_CHAOS_RESULTS=$(CURDIR)/bench/results/chaos.jsonl \
	  $(PY) -m pytest tests/chaos -p no:cacheprovider || status=$$?; \
	  $(PY) bench/chaos_table.py bench/results/chaos.jsonl; exit $$status

# The fuzz tests with 2,000 fresh random examples each (make test runs a fixed 50).
fuzz: setup tiny-model
	LORA_OPERATOR_TINY_DIR=$(TINY_DIR) LORA_FUZZ_PROFILE=chaos_full $(PY) -m pytest tests/fuzz -p no:cacheprovider

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache
