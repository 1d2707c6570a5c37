# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# `make demo ARGS="--port 8001"` passes options to `zenlm demo` (see `zenlm demo --help`).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# one stamp per set of extras: `make demo` installs only what the demo runs; `make test` adds the
# test tools (pytest, schemathesis, playwright, transformers, sentence-transformers, ...)
STAMP := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.demo-installed
ARGS ?=

.PHONY: demo test bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip >/dev/null
	# torch first, pinned: a CPU build of exactly this version is available locally
	$(BIN)/pip install torch==2.13.0

$(DEMO_STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -e '.[demo]'
	touch $(DEMO_STAMP)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -e '.[test,serve,demo]'
	touch $(STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/zenlm demo $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/pip install -e '.[bench]'
	$(BIN)/python benchmarks/bench_model.py

clean:
	rm -rf $(VENV) build *.egg-info
