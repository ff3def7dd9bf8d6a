# Exact pins for CPU machines and CI; pyproject.toml keeps ranges for GPU users.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: install demo smoke test lint bench clean

$(BIN)/alrun: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/alrun

demo: install
	$(BIN)/alrun experiment=demo

smoke: install
	$(BIN)/alrun experiment=smoke

test: install
	$(BIN)/ruff check alrun tests scripts
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python scripts/bench_overhead.py

clean:
	rm -rf outputs multirun .pytest_cache .ruff_cache
