# Two commands on a fresh machine: `make run` (chat with the default model) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build; a bare "torch" would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0
PROMPT ?= Write a Python function that checks whether a number is prime, with a short explanation.

.PHONY: setup run test test-slow lint bench browser
setup: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

run: setup
	echo "$(PROMPT)" | $(VENV)/bin/qwen2 chat --temperature 0  # greedy: the same real answer every run

test: setup browser
	$(PY) -m pytest -q -ra --durations=25  # the slowest, to keep the suite inside its time budget

# the web chat page is tested in headless Chromium (Debian's package; needs root or sudo)
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
		|| echo "warning: could not install chromium; the web page tests will be skipped"

test-slow: setup
	$(PY) -m pytest -q -ra -m slow

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(VENV)/bin/qwen2 bench
