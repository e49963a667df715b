# Tether: every target bootstraps .venv from the pinned requirements on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test browser lint bench bench-nodes bench-http bench-gateway bench-scan bench-agentdojo test-agentdojo clean

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

# AgentDojo replay: its own virtual environment. Tether's pinned set first (the same as
# .venv's), then the benchmark's packages on top without their dependencies, so Tether's
# pins never move (bench/agentdojo/requirements.txt says why).
AD_VENV    := .venv-agentdojo
AD_STAMP   := $(AD_VENV)/.installed
RUNS       ?= ../shared/corpora/agentdojo/runs-dev.tar.xz

$(AD_STAMP): bench/agentdojo/requirements.txt requirements.lock pyproject.toml
	$(PYTHON) -m venv $(AD_VENV)
	$(AD_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(AD_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -r bench/agentdojo/requirements.txt
	$(AD_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	$(AD_VENV)/bin/python -c "import agentdojo.task_suite, tether.store, bench.agentdojo.replay"
	touch $(AD_STAMP)

# RUNS: the corpus tarball (read in place, unpacked to a temporary directory) or an
# unpacked runs directory.
bench-agentdojo: $(AD_STAMP)
	$(AD_VENV)/bin/python -m bench.agentdojo.replay --runs $(RUNS) $(if $(PIPELINES),--pipelines $(PIPELINES),)

# The harness's smoke tests with live outputs (AgentDojo's tools and checkers); make test
# runs the same tests with recorded outputs only.
test-agentdojo: $(AD_STAMP)
	$(AD_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_agentdojo_replay.py

clean:
	rm -rf $(VENV) $(AD_VENV) .tether .pytest_cache .mypy_cache .ruff_cache
