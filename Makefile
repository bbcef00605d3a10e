# Two entry points for a fresh machine (see README): `make demo` and `make test`.
# Each creates .venv, installs torch first (pinned, so a CPU machine keeps its CPU wheel),
# then the project, then runs.
PYTHON ?= python3
VENV := .venv
TORCH_VERSION ?= 2.13.0
PY := $(VENV)/bin/python

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e ".[test,hf]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/unimm train --recipe debug_cpu --steps 600 --out runs/demo

test: install
	$(PY) -m pytest -q

.PHONY: install demo test
