# One entry point for every habit. The README gives two commands: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install redis demo test lint fmt clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch 2.13.0 first: the CPU wheel on local disk (a bare `torch` would pull a multi-GB CUDA build).
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps recbole==1.2.1
	touch $(STAMP)

install: $(STAMP)

redis:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing redis-server (apt)"; \
	  (apt-get update -qq && apt-get install -y -qq redis-server) >/dev/null; }

demo: install
	$(BIN)/python -m service.demo

test: install redis
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

lint: install
	$(BIN)/ruff check models training service tests
	$(BIN)/ruff format --check models training service tests
	$(BIN)/mypy

fmt: install
	$(BIN)/ruff format models training service tests
	$(BIN)/ruff check --fix models training service tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
