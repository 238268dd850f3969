# Two commands a new user needs:  `make run` (setup + index + ask, embedded defaults)  and  `make test`.
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

# The main job on embedded defaults: index the Wikipedia corpus into a Qdrant Edge shard, then ask.
run: setup
	$(VENV)/bin/fedrag-app index
	$(VENV)/bin/fedrag-app ask "who was the first president of the united states"

test: setup
	$(PY) -m pytest -q tests
