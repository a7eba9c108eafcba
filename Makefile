# One entry point for every habit. The README gives two commands: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install redis promtool demo test lint fmt clean bench wrk gpu-check wheels

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch 2.13.0 first: the CPU wheel on local disk (a bare `torch` would pull a multi-GB CUDA build).
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,bench]'
	$(BIN)/pip install -q --no-deps recbole==1.2.1
	touch $(STAMP)

install: $(STAMP)

redis:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing redis-server (apt)"; \
	  (apt-get update -qq && apt-get install -y -qq redis-server) >/dev/null; }

demo: install
	$(BIN)/python -m cli.demo

# promtool checks and unit-tests the alert rules (tests/unit/test_alert_rules.py); Debian's
# `prometheus` package ships it.
promtool:
	@command -v promtool >/dev/null 2>&1 || { \
	  echo "installing promtool (apt: prometheus)"; \
	  (apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus) >/dev/null; }

test: install redis promtool
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

wrk:
	@command -v wrk >/dev/null 2>&1 || { \
	  echo "installing wrk (apt)"; \
	  (apt-get update -qq && apt-get install -y -qq wrk) >/dev/null; }

# A short `genret bench serve` (closed loop with wrk, open loop at 50/80/95 % of the best closed-loop
# QPS, the open-loop generator's own ceiling); a full run: make bench BENCH_SERVE_ARGS="--items 1000000".
BENCH_SERVE_ARGS ?= --items 100000 --concurrency 32,64 --duration 5 --ceiling

bench: install wrk
	$(BIN)/python -m cli bench serve $(BENCH_SERVE_ARGS)

# The GPU check (scripts/gpu_check.sh): on a CUDA machine `bash scripts/gpu_check.sh --device cuda`;
# here its CPU dry run at small sizes (`make test` runs it too: tests/unit/test_gpu_check.py).
gpu-check: install
	bash scripts/gpu_check.sh --device cpu --small --out runs/gpu_check_cpu

# Packages the GPU check's HTTP step needs and the CUDA machine lacks (scripts/gpu_wheels.txt,
# name==version lines: the service's web stack): cp312 manylinux (glibc 2.17 or 2.28: torch's own
# CUDA wheels need 2.28) or pure-Python wheels into the git-ignored .whl/ (WHEEL_DIR=... elsewhere),
# carried with the check (< 64 MiB), installed there by scripts/gpu_check.sh from the folder (no index).
WHEEL_DIR ?= .whl
wheels: | $(BIN)/python
	@mkdir -p $(WHEEL_DIR)
	@reqs=$$(grep -v '^[[:space:]]*#' scripts/gpu_wheels.txt | grep -v '^[[:space:]]*$$' || true); \
	if [ -z "$$reqs" ]; then echo "wheels: scripts/gpu_wheels.txt lists none; $(WHEEL_DIR)/ stays empty"; exit 0; fi; \
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d $(WHEEL_DIR) $$reqs && \
	size=$$(du -sm $(WHEEL_DIR) | cut -f1) && echo "wheels: $$size MiB in $(WHEEL_DIR)/" && \
	{ [ $$size -lt 64 ] || { echo "wheels: $(WHEEL_DIR)/ is $$size MiB, over the 64 MiB a check may carry"; exit 1; }; }

lint: install
	$(BIN)/ruff check models training service cli benchmarks tests scripts
	$(BIN)/ruff format --check models training service cli benchmarks tests scripts
	$(BIN)/mypy

fmt: install
	$(BIN)/ruff format models training service cli benchmarks tests scripts
	$(BIN)/ruff check --fix models training service cli benchmarks tests scripts

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
