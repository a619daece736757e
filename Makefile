# The two commands a new user runs: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint bench clean lock

# The dependency tree with exact versions: requirements.lock is what the image installs
# (pyproject's dependencies), requirements-test.lock adds the test extras at the same
# versions; `make lock` regenerates both. uv resolves for the image's Python and platform
# whatever machine runs it, in seconds; pinned here because it only writes the locks.
LOCK := requirements.lock
TEST_LOCK := requirements-test.lock
UV_VERSION := 0.13.9
UV_COMPILE := --python-version 3.11 --python-platform x86_64-unknown-linux-gnu --no-header \
	--native-tls --quiet

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml $(TEST_LOCK) | $(BIN)/python
	$(BIN)/python -m pip install --quiet -r $(TEST_LOCK)
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

## Re-resolve pyproject's dependencies into the two lock files (after editing pyproject.toml).
lock: | $(BIN)/python
	$(BIN)/python -m pip install --quiet "uv==$(UV_VERSION)"
	$(BIN)/uv pip compile pyproject.toml $(UV_COMPILE) -o $(LOCK)
	$(BIN)/uv pip compile pyproject.toml --extra test -c $(LOCK) $(UV_COMPILE) -o $(TEST_LOCK)

## Run the whole job on embedded defaults (SQLite, in-process tasks, no servers).
demo: $(STAMP)
	$(BIN)/recsys pipeline --stages all
	@echo "To look at this run in the browser: $(BIN)/recsys dashboard, then http://127.0.0.1:8050" \
		"(DASHBOARD_PORT; log in as DASHBOARD_USER, default admin, with DASHBOARD_PASSWORD," \
		"recsys-dev when unset)"

## Run the whole test suite against the real Postgres, RabbitMQ and Redis.
test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check recsys shared services dashboard tests bench

bench: $(STAMP)
	$(BIN)/python bench/ingest.py

clean:
	rm -rf $(VENV) data models .pytest_cache
