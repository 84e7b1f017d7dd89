# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8866
# Kernels kept ready with the explorer already loaded, so a page shows at once (0: none).
POOL_SIZE ?= 1

.PHONY: demo test lint format bench evaluate clean-cache

# The environment is (re)installed whenever pyproject.toml is newer than the stamp.
$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

demo: $(BIN)/.installed
	$(BIN)/tfa-widgets demo --host $(HOST) --port $(PORT) --pool-size $(POOL_SIZE)

test: $(BIN)/.installed
	$(BIN)/python -m pytest -ra $(PYTEST_ARGS)

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(BIN)/.installed
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/bench_engine.py

# The cache lives in $TFA_CACHE_DIR, else ~/.cache/tfa-widgets (tfa_widgets.data.cache_dir).
clean-cache: $(BIN)/.installed
	$(BIN)/tfa-widgets clean-cache
