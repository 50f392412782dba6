# Two commands do all of the set-up on a fresh clone:
#   make bench   creates .venv if missing, then runs the main job (python -m benchmarks)
#   make test    creates .venv if missing, then runs the test suite (what .ci/run calls)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  := torch==2.13.0
STAMP  := $(VENV)/.installed
# pytest-xdist workers: one per core (the interpreter-run kernels are single-threaded numpy)
WORKERS ?= auto

.PHONY: bench test env clean

bench: $(STAMP)
	$(PY) -m benchmarks $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -n $(WORKERS) --dist worksteal $(ARGS)

env: $(STAMP)

# torch 2.13.0: a wheel already on this machine (pip's find-links) if there is one; else the CUDA
# build from PyPI where a GPU driver is present; else the CPU build from PyTorch's CPU index.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --no-index --no-deps $(TORCH) 2>/dev/null \
	  || { command -v nvidia-smi >/dev/null && $(PY) -m pip install -q $(TORCH); } \
	  || $(PY) -m pip install -q $(TORCH) --index-url https://download.pytorch.org/whl/cpu
	$(PY) -m pip install -q $(TORCH) -e ".[dev]"
	touch $@

clean:
	rm -rf $(VENV) bench-out .pytest_cache
