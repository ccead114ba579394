# Two set-up commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.blindsr-installed
WEB_STAMP := $(VENV)/.blindsr-web-installed

.PHONY: install install-web demo web test test-slow test-browser lint clean

$(STAMP): pyproject.toml
	@# (re)create the venv when it is missing or half-made (no pip, e.g. after an interrupted creation)
	@$(PY) -m pip --version >/dev/null 2>&1 || $(PYTHON) -m venv --clear $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@# Prefer a torch already on this machine's disk (CPU wheel); any torch>=2.1 works.
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0" || $(PY) -m pip install -q "torch>=2.1"
	@$(PY) -m pip install -q -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

# The web page's extra (Gradio) and what its browser tests use: Playwright driving Debian's Chromium (apt; no
# browser download). Without root or apt the Python part still installs; the browser tests then skip.
$(WEB_STAMP): $(STAMP)
	@$(PY) -m pip install -q -e ".[dev,web,webtest]"
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } ; } || \
		echo "make: chromium not installed (apt-get install chromium); the browser tests will skip"
	@touch $(WEB_STAMP)

install-web: $(WEB_STAMP)

# `blindsr web`: the page on http://127.0.0.1:7860 (Ctrl+C stops it)
web: $(WEB_STAMP)
	@$(VENV)/bin/blindsr web

demo: $(STAMP)
	@$(PY) scripts/demo.py

test: $(STAMP)
	@$(PY) -m pytest -q

test-slow: $(STAMP)
	@$(PY) -m pytest -q -m slow

test-browser: $(WEB_STAMP)
	@$(PY) -m pytest -q -m browser

lint: $(STAMP)
	@$(VENV)/bin/ruff check src tests benchmarks scripts

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
