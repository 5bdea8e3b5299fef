# Everything bootstraps from a bare python3 >= 3.11: the venv is created and reused.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FUZZ_SECONDS ?= 10
CI_FUZZ_SECONDS ?= 3
HOST ?= 127.0.0.1
PORT ?= 5006

.PHONY: all venv lint format test unit fuzz fuzz-ci bench run clean

all: test

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is required")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,dev,uvloop,gevent]"
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy --strict wse_proto

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

unit: $(STAMP)
	$(PY) -m pytest

fuzz: $(STAMP)
	$(PY) -m fuzz --seconds $(FUZZ_SECONDS)

fuzz-ci: $(STAMP)
	$(PY) -m fuzz --seconds $(CI_FUZZ_SECONDS)

test: lint unit fuzz-ci

bench: $(STAMP)
	$(PY) -m bench

run: $(STAMP)
	$(PY) -m wse_server --demo --dev --host $(HOST) --port $(PORT)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
