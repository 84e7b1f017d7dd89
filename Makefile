# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8866
# Kernels kept ready with the explorer already loaded, so a page shows at once (0: none).
POOL_SIZE ?= 1

.PHONY: demo test test-portability lint format bench evaluate clean-cache

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

# The tests marked `portability` (the numerical ones) under the thread counts and CPU kernels
# another machine could have: native and portable (ATEN_CPU_CAPABILITY=default) kernels, each with
# the default thread count and with one thread. `make test-portability PORTABILITY_ARGS=` runs
# the whole suite four times instead.
PORTABILITY_ARGS ?= -m portability
test-portability: $(BIN)/.installed
	env -u ATEN_CPU_CAPABILITY -u OMP_NUM_THREADS -u TFA_TEST_THREADS \
		$(BIN)/python -m pytest -ra $(PORTABILITY_ARGS) $(PYTEST_ARGS)
	env -u ATEN_CPU_CAPABILITY OMP_NUM_THREADS=1 TFA_TEST_THREADS=1 \
		$(BIN)/python -m pytest -ra $(PORTABILITY_ARGS) $(PYTEST_ARGS)
	env -u OMP_NUM_THREADS -u TFA_TEST_THREADS ATEN_CPU_CAPABILITY=default \
		$(BIN)/python -m pytest -ra $(PORTABILITY_ARGS) $(PYTEST_ARGS)
	env ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=1 TFA_TEST_THREADS=1 \
		$(BIN)/python -m pytest -ra $(PORTABILITY_ARGS) $(PYTEST_ARGS)

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
