# Quick start: `make serve` (gateway on 127.0.0.1:8000), `make test` (the default suite).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
MODEL  ?= models/demo
HOST   ?= 127.0.0.1
PORT   ?= 8000
ENGINE ?= reference
WORKERS ?= 1
PLUGINS := plugins/vllm plugins/sglang plugins/trtllm plugins/nixl

.PHONY: setup serve test lint typecheck pytest bench clean

$(STAMP): pyproject.toml constraints-cpu.txt $(addsuffix /pyproject.toml,$(PLUGINS))
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints-cpu.txt -e '.[dev]' $(addprefix -e ,$(PLUGINS))
	touch $(STAMP)

setup: $(STAMP)

$(MODEL)/config.json: | $(STAMP)
	$(BIN)/dynamo-gateway demo-model $(MODEL)

serve: $(STAMP) $(MODEL)/config.json
	$(BIN)/dynamo-gateway serve --model $(MODEL) --engine $(ENGINE) --workers $(WORKERS) \
		--host $(HOST) --port $(PORT)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/pytest -q

test: lint typecheck pytest

bench: $(STAMP) $(MODEL)/config.json
	$(BIN)/python benchmarks/frontend_overhead.py --model $(MODEL)

clean:
	rm -rf $(VENV) $(MODEL) .pytest_cache .mypy_cache .ruff_cache
