# Two commands on a fresh machine: `make run` (chat with the default model) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build; a bare "torch" would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0
PROMPT ?= Write a Python function that checks whether a number is prime, with a short explanation.

.PHONY: setup run test test-slow lint bench
setup: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

run: setup
	echo "$(PROMPT)" | $(VENV)/bin/qwen2 chat

test: setup
	$(PY) -m pytest -q -ra

test-slow: setup
	$(PY) -m pytest -q -ra -m slow

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) bench/bench_default.py
