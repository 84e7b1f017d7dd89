# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8866
# Kernels kept ready with the explorer already loaded, so a page shows at once (0: none).
POOL_SIZE ?= 1

.PHONY: demo test test-portability test-peers lint format bench bench-scale bench-peers evaluate clean-cache docs

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

# The docs site, into build/site: strict (a broken reference or an incomplete docstring of a
# public name fails it); the worked studies are executed on the demo while it builds.
$(BIN)/.docs-installed: $(BIN)/.installed
	$(BIN)/python -m pip install --quiet -e ".[dev,docs]"
	touch $@

docs: $(BIN)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/bench_engine.py

# Issue #15's scale figures (ResNet-18 build, memory at N = 50,000, 1.28M-row search, gloo):
# long (tens of minutes on two cores).
bench-scale: $(BIN)/.installed
	PYTHONPATH=$(CURDIR) $(BIN)/python benchmarks/bench_scale.py

# The peers (quanda, dattri, kronfluence, Captum 0.8 as quanda pins it) live in their own
# environment, never in the default one: it reuses the default environment's packages (torch is not installed twice)
# through a .pth file and shadows only what the peers pin. quanda 0.5 pins captum<0.9, whose
# metadata asks numpy<2, while its own pyarrow needs numpy>=2: the peers' numpy is removed so the
# default environment's numpy 2 is used (captum 0.8 runs with it). quanda imports omegaconf
# without declaring it.
PEERS ?= .venv-peers
$(PEERS)/.installed: $(BIN)/.installed
	test -x $(PEERS)/bin/python || $(BIN)/python -m venv $(PEERS)
	$(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > \
		"$$($(PEERS)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/_default_env.pth"
	$(PEERS)/bin/python -m pip install --quiet "quanda==0.5.0" "dattri==0.3.0" "kronfluence==1.0.1" \
		omegaconf
	$(PEERS)/bin/python -m pip uninstall --quiet --yes numpy
	$(PEERS)/bin/python -c "import quanda, dattri, kronfluence, captum, numpy; \
		assert numpy.__version__ >= '2'"
	test "$$($(PEERS)/bin/python -c 'import torch; print(torch.__file__)')" = \
		"$$($(BIN)/python -c 'import torch; print(torch.__file__)')"  # no peer brought its own torch
	touch $@

bench-peers: $(PEERS)/.installed
	$(PEERS)/bin/python benchmarks/bench_peers.py $(BENCH_ARGS)

# Agreement with kronfluence's and dattri's own code (tests/test_peer_agreement.py: skipped in the
# default environment, where the peers are not installed). Not part of `make test`.
test-peers: $(PEERS)/.installed
	PYTHONPATH=$(CURDIR) $(PEERS)/bin/python -m pytest -ra tests/test_peer_agreement.py $(PYTEST_ARGS)

# The cache lives in $TFA_CACHE_DIR, else ~/.cache/tfa-widgets (tfa_widgets.data.cache_dir).
clean-cache: $(BIN)/.installed
	$(BIN)/tfa-widgets clean-cache
