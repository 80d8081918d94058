# Two commands on a fresh machine: `make train` and `make test`.
# Each creates (or reuses) a local virtual environment with the pinned requirements.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: train test bench clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

train: $(VENV)/.installed
	$(PY) train.py

test: $(VENV)/.installed
	$(PY) -m pytest

bench: $(VENV)/.installed
	$(PY) bench.py

clean:
	rm -rf $(VENV) out data/reasoning
