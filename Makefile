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

# ---- the GPU build without a GPU, and the prepared GPU check (scripts/compile_check.py, scripts/gpu_check.py)
.PHONY: compile-check compile-check-full compile-check-triton36 gpu-check
VENV36 ?= .venv-triton36
PY36 := $(VENV36)/bin/python
GPU_PYTHON ?= python3

# every Triton kernel with the configs its pruner keeps, compiled for sm_90a and sm_80; fails on any spill
compile-check: $(VENV)/.installed
	$(PY) scripts/compile_check.py --quiet

compile-check-full: $(VENV)/.installed
	$(PY) scripts/compile_check.py --quiet --full

# the same under triton 3.6 (the GPU machines' oldest): a second venv holding only triton 3.6.0, which borrows
# torch, numpy and pytest from $(VENV) through a .pth file (its own triton comes first on sys.path)
$(VENV36)/.installed: $(VENV)/.installed
	$(PYTHON) -m venv $(VENV36)
	$(PY36) -m pip install -q --no-deps triton==3.6.0
	$(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > \
		"$$($(PY36) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/_borrowed_from_venv.pth"
	touch $@

compile-check-triton36: $(VENV36)/.installed
	$(PY36) -c "import triton; assert triton.__version__.startswith('3.6'), triton.__version__"
	$(PY36) scripts/compile_check.py --quiet
	$(PY36) -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "pruners or hopper"

# on a GPU machine, with its own torch and triton (nothing installed); DRY_RUN=1 runs it small on CPU
gpu-check:
	$(GPU_PYTHON) scripts/gpu_check.py $(if $(DRY_RUN),--dry-run)
