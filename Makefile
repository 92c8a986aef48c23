# The two commands of the README: `make demo` (set up, then run the default job) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench env clean

env: $(STAMP)

# torch is installed first and pinned: an unpinned torch (direct or via accelerate) pulls GBs of CUDA wheels.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	scripts/netns-run $(PY) jobs/caption.py

test: $(STAMP)
	scripts/netns-run $(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m benchmarks.prefill

clean:
	rm -rf $(VENV) out
