# Two commands a new user needs:  `make run` (setup + the main job on embedded defaults)  and  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION = 1
export FLWR_TELEMETRY_ENABLED ?= 0
export FEDRAG_DATA_DIR ?= $(abspath ../shared/data)

.PHONY: setup run test

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	VENV=$(VENV) scripts/setup.sh
	touch $@

setup: $(VENV)/.installed

# The main job on embedded defaults (fedrag_app/commands/quickstart.py): index small shards, federated RALT over 3
# institutions with `flwr run .` (Flower simulation), the server evaluating before and after, ask; ends with a summary.
# ARGS passes options through, e.g. make run ARGS="--rounds 3 --verbose".
run: setup
	$(VENV)/bin/fedrag-app quickstart $(ARGS)

# Lint and format check (ruff, configured in pyproject.toml), then the tests; pytest prints the slowest.
# TEST_WORKERS pytest-xdist workers (one thread each, tests/conftest.py), one test file per worker at a time: the
# deployment tests share a federation within their file. TEST_WORKERS=0 runs them serially in this process.
# Longest files first (tests/conftest.py, kept by --no-loadscope-reorder). Measured on 2 cores, same machine and
# venv: 12:00 in xdist's own order, 11:16 longest-first with the deployment federations in two files; 4 workers
# 11:53 (both cores are busy throughout: more workers only add contention).
TEST_WORKERS ?= 3
test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests
