# The two commands of the quick start:
#   make demo   train a small super-resolution model on the built-in photos (CPU, under 10 minutes), then sample
#   make test   run the test suite
# Each creates .venv on first use, installs CPU PyTorch and the package, and fetches the pretrained weights.
# For a CUDA build of PyTorch: make test TORCH="torch --index-url https://download.pytorch.org/whl/cu124"

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.chimle-installed

.PHONY: demo test weights install clean-venv

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

weights: $(STAMP)
	$(BIN)/chimle weights fetch

demo: weights
	$(BIN)/chimle demo

test: weights
	$(BIN)/python -m pytest -q

clean-venv:
	rm -rf $(VENV)
