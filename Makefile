# Two commands matter (README): `make demo` and `make test`. Both bootstrap .venv by themselves.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.meshward-installed
OTEL_PROTO := $(shell sed -n 's/^opentelemetry-proto==//p' constraints.txt)

.PHONY: demo test lint typecheck check bench clean venv tools fleet-js

# Debian tools the tests and benchmarks use: docker-compose validates the compose file (no
# engine runs here), wrk generates load, PostgreSQL (initdb, pg_ctl) backs the flow-store tests,
# promtool checks the alert rules, headless chromium renders the HTML report.
# Installed when missing and we are root (as in CI). Each entry is COMMAND:PACKAGE.
SYSTEM_TOOLS := docker-compose:docker-compose wrk:wrk initdb:postgresql promtool:prometheus chromium:chromium

venv: $(STAMP)

# xds-protos ships an old copy of opentelemetry-proto's files and overwrites them (DESIGN.md field
# notes), so after every install the real opentelemetry-proto is laid down again and checked.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev,edge]'
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps opentelemetry-proto==$(OTEL_PROTO)
	$(BIN)/python -c "from opentelemetry.proto.trace.v1.trace_pb2 import ScopeSpans"
	$(BIN)/meshward doctor >/dev/null
	@touch $(STAMP)

# bench/xds_fleet.py --nodes-impl node: the Node.js simulated nodes' packages (protobufjs), from
# the committed lock file, when missing and `npm` is there (the integration test skips without).
FLEET_JS := bench/fleet_js
fleet-js: $(FLEET_JS)/node_modules/.package-lock.json

$(FLEET_JS)/node_modules/.package-lock.json: $(FLEET_JS)/package-lock.json
	@if command -v npm >/dev/null; then cd $(FLEET_JS) && npm ci --no-audit --no-fund --silent; \
	else echo "note: install Node.js 20+ and npm for bench/xds_fleet.py --nodes-impl node"; fi

tools:
	@missing=""; for t in $(SYSTEM_TOOLS); do cmd=$${t%%:*}; \
	  command -v $$cmd >/dev/null || ls /usr/lib/postgresql/*/bin/$$cmd >/dev/null 2>&1 || missing="$$missing $${t#*:}"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing$$missing (Debian packages)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "note: install$$missing (Debian packages) for the compose-file check, load tests, PostgreSQL flow-store tests, Prometheus rule tests and the HTML report test (headless chromium)"; fi; \
	fi

demo: $(STAMP)
	$(BIN)/meshward demo --chapter all

# Two xdist workers (CI has two cores; most integration time is spent waiting on real processes);
# tests/conftest.py keeps each module on one worker. PYTEST_WORKERS=0 runs it in one process.
PYTEST_WORKERS ?= 2
test: $(STAMP) tools fleet-js
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy meshward bench

check: lint typecheck test

bench: $(STAMP) tools fleet-js
	@for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
