# Tether: every target bootstraps .venv from the pinned requirements on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test browser lint bench bench-nodes bench-http bench-gateway bench-scan bench-agentdojo agentdojo-runs clean

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m tether.demo $(if $(ONCE),--once,)

# The console's browser tests drive Debian's Chromium (never a downloaded browser build).
CHROMIUM := /usr/bin/chromium
SUDO     := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

browser:
	@test -x $(CHROMIUM) || { $(SUDO) apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends chromium; }

test: $(STAMP) browser
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
	$(BIN)/python bench/cascade.py
	$(BIN)/python bench/console.py
	$(BIN)/python bench/nodes.py

# Decisions per second with one, two and three nodes over PostgreSQL (127.0.0.1:5432, test).
bench-nodes: $(STAMP)
	$(BIN)/python bench/nodes.py

bench-http: $(STAMP)
	$(BIN)/python bench/http_authorize.py

bench-gateway: $(STAMP)
	$(BIN)/python bench/gateway.py

bench-scan: $(STAMP)
	$(BIN)/python bench/scan.py

# AgentDojo replay: its own virtual environment, so the benchmark's dependencies
# never touch the pinned one above.
AD_VENV    := .venv-agentdojo
AD_STAMP   := $(AD_VENV)/.installed
AD_TARBALL ?= ../shared/corpora/agentdojo/runs-dev.tar.xz

$(AD_STAMP): bench/agentdojo/requirements.txt pyproject.toml
	$(PYTHON) -m venv $(AD_VENV)
	$(AD_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r bench/agentdojo/requirements.txt
	$(AD_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(AD_STAMP)

agentdojo-runs:
	mkdir -p bench/results/agentdojo-runs
	tar -xJf $(AD_TARBALL) -C bench/results/agentdojo-runs

bench-agentdojo: $(AD_STAMP)
	@test -n "$(RUNS)" || { echo "usage: make bench-agentdojo RUNS=DIR [PIPELINES=a,b,...]" >&2; exit 2; }
	$(AD_VENV)/bin/python -m bench.agentdojo.replay --runs $(RUNS) $(if $(PIPELINES),--pipelines $(PIPELINES),)

clean:
	rm -rf $(VENV) $(AD_VENV) .tether .pytest_cache .mypy_cache .ruff_cache
