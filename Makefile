# The two commands of README.md: `make demo` and `make test`. Both set the machine up first
# (scripts/setup.sh: apt packages, Redis, dockerd, .venv, the sandbox-agent binary, the sandbox image)
# and are quick when everything is already there.
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint typecheck unit bench

setup:
	scripts/setup.sh

# AGENT=claude (default), codex, opencode or mock: a real session against the demo's stand-in LLM API.
AGENT ?= claude
demo: setup
	AGENT=$(AGENT) BIN=$(BIN) scripts/demo.sh

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

# Every scenario of bench/scenarios.py side by side (baseline by hand, cold through the queue, real agents, a burst,
# the orchestration's ceiling): p50/p95/p99, the ratio to the baseline, stage timings; also in bench/results.json.
# RUNS timed sessions per scenario, BURST sessions at once, SCENARIOS to pick some; bounded by BENCH_SECONDS.
RUNS ?= 10
BURST ?= 100
SCENARIOS ?= baseline,cold-mock,warm-mock,warm-mock-cwd,cold-claude,warm-claude,warm-claude-restart,warm-claude-vault,cold-codex,warm-codex,burst,ceiling
BENCH_SECONDS ?= 600
bench: setup
	PYTHONPATH=$(CURDIR) $(BIN)/python -m bench --runs $(RUNS) --burst $(BURST) --scenarios $(SCENARIOS) \
		--max-seconds $(BENCH_SECONDS)
