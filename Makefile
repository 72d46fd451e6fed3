# Two commands for a newcomer:  `make up`  (the main job)  and  `make test`  (lint, types, tests).
# Both create the virtual environment and install what they need on first use.

PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
PKG_DIRS := ascl training export serving demo model_cards
TYPECHECK_TREE := build/typecheck
# The Triton Python stub that nvidia-pytriton ships needs NumPy < 2 (see serving/online/server.py):
# prepare its small side environment at install time, not at the first server start.
STUB_ENV = $(BIN)/python -c "from ascl.serving.online.server import prepared_stub_env; prepared_stub_env()"
# setuptools notes every editable install of a package-dir layout ("Editable installation ... folders in
# your working directory"); informational only, so the install stays quiet. Real warnings still show.
QUIET_EDITABLE = PYTHONWARNINGS="ignore:Editable installation"

.PHONY: up test lint typecheck pytest install-dev install-run browser clean

up: $(VENV)/.installed-run
	$(BIN)/ascl up $(ARGS)

test: lint typecheck pytest

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .

# setuptools maps ascl.training -> training/ etc.; mypy cannot follow the editable-install
# import hook, so it checks a tree of symbolic links laid out as the installed package.
typecheck: $(VENV)/.installed-dev
	rm -rf $(TYPECHECK_TREE) && mkdir -p $(TYPECHECK_TREE)/ascl
	for f in ascl/*.py; do ln -s "$(CURDIR)/$$f" $(TYPECHECK_TREE)/ascl/; done
	for d in training export serving demo model_cards; do ln -s "$(CURDIR)/$$d" $(TYPECHECK_TREE)/ascl/$$d; done
	cd $(TYPECHECK_TREE) && $(CURDIR)/$(BIN)/mypy --config-file $(CURDIR)/pyproject.toml -p ascl

pytest: $(VENV)/.installed-dev browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Debian's chromium for the browser tests (never `playwright install`: it downloads a browser).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium for the browser tests"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed-dev: pyproject.toml | $(VENV)/bin/python
	$(QUIET_EDITABLE) $(BIN)/python -m pip install -q -e '.[dev]'
	$(STUB_ENV)
	touch $@

$(VENV)/.installed-run: pyproject.toml | $(VENV)/bin/python
	$(QUIET_EDITABLE) $(BIN)/python -m pip install -q -e '.[train,export,serve,demo]'
	$(STUB_ENV)
	touch $@

clean:
	rm -rf build $(VENV) .mypy_cache .ruff_cache .pytest_cache
