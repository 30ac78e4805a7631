# The two commands a newcomer needs:  make demo  and  make test.
# Both set everything up on a fresh machine (a virtualenv with every dependency).

PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TS      := clients/typescript
NODE_STAMP := $(TS)/node_modules/.installed
BROWSER := tests/browser
BROWSER_STAMP := $(BROWSER)/node_modules/.installed

.PHONY: demo test test-fast bench bench-smoke screenshots setup system-packages lint typecheck contract generate check-generated pytest clean

demo: setup
	$(BIN)/python scripts/demo.py

test: setup lint typecheck contract check-generated pytest

# The edit-test loop, about a minute on 2 cores: the unit tests and the integration tests
# on SQLite alone (no PostgreSQL, no Ray, no Node or Go, nothing marked slow), on the same
# processes as `make test`'s first phase. `make test` runs all.
test-fast: $(STAMP)
	CP_TEST_DATABASES=sqlite CP_NO_SKIPS=$(CP_NO_SKIPS) $(BIN)/python -m pytest \
		-p no:cacheprovider -rs -q -n $(PYTEST_WORKERS) -m "not ray and not slow" \
		tests/unit tests/integration

# Every benchmark beside its anchor, one table (bench/README.md); needs the PostgreSQL
# server at 127.0.0.1:5432 and a package index. bench-smoke: tiny sizes, as CI runs them.
bench: setup
	$(BIN)/python bench/run.py

bench-smoke: setup
	$(BIN)/python bench/run.py --smoke

setup: system-packages $(STAMP) $(NODE_STAMP) $(BROWSER_STAMP)

# Debian packages (scripts/system_packages.sh says which and why: buildah and skopeo for
# `modelctl build export --oci`, Go for its client, Chromium for the console's browser
# tests); a no-op when present, a warning (and skipped tests) where they cannot be installed.
system-packages:
	bash scripts/system_packages.sh

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The TypeScript client's packages, exactly as package-lock.json pins them (npm registry).
$(NODE_STAMP): $(TS)/package.json $(TS)/package-lock.json
	cd $(TS) && npm ci --no-audit --no-fund --loglevel=error
	touch $(NODE_STAMP)

# What the console's browser tests inject into its pages (axe-core), as pinned in
# tests/browser/package-lock.json. The browser itself is Debian's Chromium (system-packages).
$(BROWSER_STAMP): $(BROWSER)/package.json $(BROWSER)/package-lock.json
	cd $(BROWSER) && npm ci --no-audit --no-fund --loglevel=error
	touch $(BROWSER_STAMP)

lint:
	$(BIN)/ruff check src tests scripts bench examples
	$(BIN)/ruff format --check src tests scripts bench examples

typecheck:
	$(BIN)/mypy

contract:
	$(BIN)/buf lint
	$(BIN)/buf breaking --against protos/release/v1.binpb

generate:
	PATH=$(CURDIR)/$(BIN):$$PATH scripts/gen_protos.sh

check-generated:
	PATH=$(CURDIR)/$(BIN):$$PATH scripts/check_generated.sh

# A skipped test (a tool make setup could not install) fails the run; CP_NO_SKIPS=0 lets
# it pass, e.g. where make setup is not run as root.
# The tests without Ray (unit, integration, browser) run on three processes (pytest-xdist:
# each its own databases, ports and servers; they wait on servers, databases and
# subprocesses enough that three keep 2 cores busier than two: measured 5.6 against
# ~8 minutes, four 5.2); those on Ray after them, one at a time, on
# the session's cluster. Each run fails on its own (exit code 5, no tests, included), and
# ends with its slowest tests (the suite's time budget: README).
CP_NO_SKIPS ?= 1
PYTEST_WORKERS ?= 3
pytest:
	CP_NO_SKIPS=$(CP_NO_SKIPS) $(BIN)/python -m pytest -p no:cacheprovider -rs --durations=15 \
		-n $(PYTEST_WORKERS) tests/unit tests/integration tests/browser
	CP_NO_SKIPS=$(CP_NO_SKIPS) $(BIN)/python -m pytest -p no:cacheprovider -rs --durations=30 \
		tests/ray

# The pages' screenshots in docs/console/ (README and docs/console.md show them), taken by
# the browser tests, the Ray ones included.
screenshots: setup
	CP_SCREENSHOTS=$(CURDIR)/docs/console $(BIN)/python -m pytest -p no:cacheprovider -q \
		tests/browser tests/ray/test_console_ray.py

clean:
	rm -rf $(VENV) .modelctl .demo
