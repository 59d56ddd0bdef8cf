# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-gpu-torch install clean

$(STAMP): requirements.txt setup.py $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m mdm_fast.cli.main demo

test: $(STAMP)
	$(PY) -m pytest -q tests

# The torch of the lent GPU machines (CI pins another): the tests that depend most on torch's version
# (torch.compile and dynamo, the custom ops' opcheck, the precompile pool, the sm_90 compile checks) run
# against it here on the CPU, so that a lease does not find out first. Its PyPI wheel is a CUDA build
# (about 5 GB in the venv); CI runs this after `make test`.
GPU_TORCH := 2.11.0
GPU_VENV := .venv-torch$(GPU_TORCH)
GPU_STAMP := $(GPU_VENV)/.installed

$(GPU_STAMP): requirements.txt setup.py $(wildcard csrc/*)
	test -x $(GPU_VENV)/bin/python || $(PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install -q --upgrade pip wheel  # (bdist_wheel: its setuptools is older)
	sed 's/^torch==.*/torch==$(GPU_TORCH)/' requirements.txt >$(GPU_VENV)/requirements.txt
	$(GPU_VENV)/bin/python -m pip install -q -r $(GPU_VENV)/requirements.txt
	$(GPU_VENV)/bin/python -m pip install -q --no-build-isolation --no-deps -e .
	touch $(GPU_STAMP)

test-gpu-torch: $(GPU_STAMP)
	$(GPU_VENV)/bin/python -m pytest -q tests -k "compile or opcheck or graph_break or dynamo"

clean:
	rm -rf build *.egg-info mdm_fast/_C*.so
