# Every target does its own setup: a fresh machine needs only python3 (3.11+), npm and apt.
VENV      ?= .venv
PY        := $(VENV)/bin/python
STAMP     := $(VENV)/.installed
CONFIG    ?= ioc_configs/sim.toml
PYTEST_ARGS ?=

.PHONY: run sim test lint bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $@

venv: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/dtacq-ioc run $(CONFIG)

sim: $(STAMP)
	$(VENV)/bin/dtacq-ioc sim $(CONFIG)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: $(STAMP) test-deps lint
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# Services and tools the tests run for real (pouchdb-server, Chromium, systemd-analyze).
POUCHDB   := tests/node/node_modules/.bin/pouchdb-server

test-deps: $(POUCHDB)
	command -v systemd-analyze || (apt-get update && apt-get install -y systemd)
	test -x /usr/bin/chromium || (apt-get update && apt-get install -y chromium)

# pouchdb-server stands in for CouchDB; `npm ci` installs exactly the lock, once.
$(POUCHDB): tests/node/package.json tests/node/package-lock.json
	npm ci --prefix tests/node --no-audit --no-fund
	touch $@

clean:
	rm -rf $(VENV) var
