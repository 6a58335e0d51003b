.DEFAULT_GOAL := help
VENV ?= .venv
PY := $(VENV)/bin/python

help: ## Show the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

install: ## Create .venv and install the project with dev and student extras
	python3 -m venv $(VENV)
	$(PY) -m pip install -e '.[dev,student]'

lint: ## Ruff lint and format check, the import contract (service never imports workers)
	$(VENV)/bin/ruff check service workers tests bench
	$(VENV)/bin/ruff format --check service workers tests bench
	$(VENV)/bin/lint-imports

typecheck: ## mypy --strict on service and workers
	$(VENV)/bin/mypy

test: ## The test suite (real Postgres and Redis on 127.0.0.1), the fault suite's core included
	$(PY) -m pytest -q -m "not faults"

faults: ## The whole fault suite: real workers, beat, restarts and kills (a few minutes)
	$(PY) -m pytest -q tests/faults

conformance: ## schemathesis, every check, ~9,500 requests against the API in production mode
	$(PY) -m bench.openapi_conformance

check: lint typecheck test ## Everything CI runs
