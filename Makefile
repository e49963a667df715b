# Tether: every target bootstraps .venv from the pinned requirements on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench bench-http bench-gateway clean

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m tether.demo $(if $(ONCE),--once,)

test: $(STAMP)
	$(BIN)/python -m pytest
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python bench/decide.py
	$(BIN)/python bench/http_authorize.py
	$(BIN)/python bench/broker.py

bench-http: $(STAMP)
	$(BIN)/python bench/http_authorize.py

bench-gateway: $(STAMP)
	$(BIN)/python bench/gateway.py

clean:
	rm -rf $(VENV) .tether .pytest_cache .mypy_cache .ruff_cache
