# Two set-up commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.blindsr-installed

.PHONY: install demo test test-slow lint clean

$(STAMP): pyproject.toml
	@# (re)create the venv when it is missing or half-made (no pip, e.g. after an interrupted creation)
	@$(PY) -m pip --version >/dev/null 2>&1 || $(PYTHON) -m venv --clear $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@# Prefer a torch already on this machine's disk (CPU wheel); any torch>=2.1 works.
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0" || $(PY) -m pip install -q "torch>=2.1"
	@$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	@$(PY) scripts/demo.py

test: $(STAMP)
	@$(PY) -m pytest -q

test-slow: $(STAMP)
	@$(PY) -m pytest -q -m slow

lint: $(STAMP)
	@$(VENV)/bin/ruff check src tests benchmarks scripts

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
