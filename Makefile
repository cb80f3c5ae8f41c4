# Every target does its own setup: a fresh machine needs only python3 (3.11+), npm and apt.
VENV      ?= .venv
PY        := $(VENV)/bin/python
STAMP     := $(VENV)/.installed
CONFIG    ?= ioc_configs/sim.toml
PYTEST_ARGS ?=

.PHONY: run sim test test-deps lint bench-deps clean venv

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# Benchmarks' extra baselines (pythonSoftIOC) and profiler.
bench-deps: $(STAMP)
	$(PY) -m pip install -q -e '.[test,bench]'

venv: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/dtacq-ioc run $(CONFIG)

sim: $(STAMP)
	$(VENV)/bin/dtacq-ioc sim $(CONFIG)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: $(STAMP) test-deps lint
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# Services and tools the tests run for real (pouchdb-server, Chromium, systemd-analyze).
POUCHDB   := tests/node/node_modules/.bin/pouchdb-server

# Debian packages: systemd-analyze (the unit file's test) and Chromium (the page's test).
test-deps: $(POUCHDB)
	@missing=""; \
	command -v systemd-analyze >/dev/null || missing="$$missing systemd"; \
	test -x /usr/bin/chromium || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
		echo "installing from Debian:$$missing"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi

# pouchdb-server stands in for CouchDB; `npm ci` installs exactly the lock, once.
$(POUCHDB): tests/node/package.json tests/node/package-lock.json
	npm ci --prefix tests/node --no-audit --no-fund
	touch $@

clean:
	rm -rf $(VENV) var
