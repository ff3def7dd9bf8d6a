# Exact pins for CPU machines and CI; pyproject.toml keeps ranges for GPU users.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
# Test tiers (docs/testing.md): the fast tier is pyproject's default selection; the second tier
# is the `integration` marker; `all` = both, what CI runs (slow, gpu and mmdet stay out).
INTEGRATION := -m 'integration and not slow and not gpu and not mmdet'
ALL_TIERS := -m 'not slow and not gpu and not mmdet'

.PHONY: install demo smoke test test-integration test-all docs lint bench clean

$(BIN)/alrun: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q -e '.[dev,docs]'
	touch $@

install: $(BIN)/alrun

demo: install
	$(BIN)/alrun experiment=demo

smoke: install
	$(BIN)/alrun experiment=smoke

lint: install
	$(BIN)/ruff check alrun tests scripts

# ruff + the fast tier (unit, contract, one end-to-end run per family): <= 5 min on 2 cores
test: lint
	$(BIN)/python -m pytest -q --durations=15

# the second tier: every further end-to-end run, sweeps, scripts, report rendering
test-integration: install
	$(BIN)/python -m pytest -q $(INTEGRATION)

test-all: install
	$(BIN)/python -m pytest -q $(ALL_TIERS)

# the manual as a static site in site/; strict: a broken link or anchor, or a page missing
# from the nav, fails; the strategy table and config groups are generated from alrun/configs
docs: install
	$(BIN)/mkdocs build --strict

bench: install
	$(BIN)/python scripts/bench_overhead.py

clean:
	rm -rf outputs multirun site .pytest_cache .ruff_cache
