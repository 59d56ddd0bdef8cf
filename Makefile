# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-gpu-torch install clean

# $(call install,VENV,TORCH): VENV with requirements.txt (its torch pin replaced by TORCH) and this package
# (`wheel`: bdist_wheel for the editable install where the venv's setuptools is older than 70.1)
define install
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip wheel
	sed 's/^torch==.*/torch==$(2)/' requirements.txt >$(1)/requirements.txt
	$(1)/bin/python -m pip install -q -r $(1)/requirements.txt
	$(1)/bin/python -m pip install -q --no-build-isolation --no-deps -e .
	touch $(1)/.installed
endef

$(STAMP): requirements.txt setup.py $(wildcard csrc/*)
	$(call install,$(VENV),$(shell sed -n 's/^torch==//p' requirements.txt))

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
	$(call install,$(GPU_VENV),$(GPU_TORCH))

test-gpu-torch: $(GPU_STAMP)
	$(GPU_VENV)/bin/python -m pytest -q tests -k "compile or opcheck or graph_break or dynamo"

clean:
	rm -rf build *.egg-info mdm_fast/_C*.so
