# `make run`: a running daemon on http://127.0.0.1:8000 with a private PostgreSQL and
# Mosquitto under ./var/ (unless DATABASE_URL / MQTT_URL say otherwise).
# `make test`: the same set-up, then lint, type checks and the whole test suite.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench clean system-deps lock

run: $(STAMP) system-deps
	$(BIN)/energy-ingest run

test: $(STAMP) lint
	@TESTS=1 scripts/system-deps.sh
	$(BIN)/pytest

# A short version of every benchmark (see BENCHMARKS.md for the full ones).
bench: $(STAMP)
	@BENCH=1 scripts/system-deps.sh
	$(BIN)/energy-ingest bench all --short --runs 1

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

system-deps:
	@scripts/system-deps.sh

# Every dependency at the exact version and hash of the lock file, then the project itself.
$(STAMP): pyproject.toml requirements-test.lock
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
		echo "python3 -m venv failed; installing python3-venv"; \
		apt-get install -y -q python3-venv >/dev/null && $(PYTHON) -m venv $(VENV); }
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q --require-hashes -r requirements-test.lock
	$(BIN)/pip install -q --no-deps -e .
	@touch $@

# After changing a dependency in pyproject.toml: pin again (requirements.lock for the
# Dockerfile, requirements-test.lock for make test and CI).
lock: $(STAMP)
	$(BIN)/pip install -q pip-tools
	$(BIN)/pip-compile -q --strip-extras --generate-hashes --allow-unsafe \
		--no-emit-index-url --no-emit-find-links -o requirements.lock pyproject.toml
	$(BIN)/pip-compile -q --strip-extras --generate-hashes --allow-unsafe \
		--no-emit-index-url --no-emit-find-links --extra test -o requirements-test.lock pyproject.toml

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache *.egg-info
