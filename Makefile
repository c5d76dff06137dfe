# The two commands of README.md: `make demo` and `make test`. Both set the machine up first
# (scripts/setup.sh: apt packages, Redis, dockerd, .venv, the sandbox-agent binary, the sandbox image)
# and are quick when everything is already there.
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint typecheck unit bench

setup:
	scripts/setup.sh

demo: setup
	scripts/demo.sh

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy

# ruff, mypy, then every test (integration tests included: they use the Redis, Docker engine and image
# that setup provides).
test: lint typecheck
	$(BIN)/pytest -p no:cacheprovider

# Unit tests only: pure logic and the pipeline on the fake provider; needs neither Redis nor Docker.
unit:
	scripts/setup.sh --venv-only
	$(BIN)/pytest -p no:cacheprovider -m "not integration"

bench: setup
	$(BIN)/python -m bench.bringup
