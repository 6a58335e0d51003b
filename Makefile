.DEFAULT_GOAL := help
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

help: ## Show the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

# What lint, typecheck and test run. README command 1 installs only the student and
# local-teacher extras, so `make check` right after it finds none of these.
DEV_TOOLS := $(VENV)/bin/ruff $(VENV)/bin/mypy $(VENV)/bin/lint-imports $(VENV)/bin/pytest

install: ## Create .venv and install the project with dev and student extras
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -e '.[dev,student]'

dev-tools: ## Install the dev and student extras into $(VENV) when a tool of `make check` is missing
	@missing=""; for tool in $(DEV_TOOLS); do [ -x "$$tool" ] || missing="$$missing $${tool##*/}"; done; \
	if [ -n "$$missing" ]; then \
	  echo "make: $(VENV) lacks the dev tools:$$missing; installing them (make install does the same):" >&2; \
	  $(MAKE) --no-print-directory install VENV=$(VENV) PYTHON=$(PYTHON) || { \
	    echo "make: installing the dev tools failed; run: $(PYTHON) -m venv $(VENV) && $(PY) -m pip install -e '.[dev,student]'" >&2; \
	    exit 1; }; \
	fi

services: ## Check that PostgreSQL and Redis answer on 127.0.0.1 (say how to start them if not)
	@$(PYTHON) .ci/check-services

lint: dev-tools ## Ruff lint and format check, the import contract (service never imports workers)
	$(VENV)/bin/ruff check service workers tests bench
	$(VENV)/bin/ruff format --check service workers tests bench
	$(VENV)/bin/lint-imports

typecheck: dev-tools ## mypy --strict on service, workers and bench
	$(VENV)/bin/mypy

# Test processes (pytest-xdist): a test file runs whole in one of them, so a module's server or
# stack starts once. The suite waits on the processes it starts more than it computes: 3 took
# it from 17 to 10 minutes on 2 cores. TEST_PROCESSES=0 runs it in this process.
TEST_PROCESSES ?= 3

test: dev-tools services ## The test suite (real Postgres and Redis on 127.0.0.1), the fault suite's core included
	$(PY) -m pytest -q -m "not faults" -n $(TEST_PROCESSES) --dist loadfile

faults: dev-tools services ## The whole fault suite: real workers, beat, restarts and kills (a few minutes)
	$(PY) -m pytest -q tests/faults

conformance: ## schemathesis, every check, ~9,500 requests against the API in production mode
	$(PY) -m bench.openapi_conformance

check: lint typecheck test ## Everything CI runs
