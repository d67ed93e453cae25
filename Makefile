# Two commands on a fresh machine (Python >= 3.10 and pip):
#   make demo   the whole pipeline on synthetic phantoms -> runs/demo/report.html (11 min on 2 cores)
#   make test   the test suite (CPU)
# Both create or refresh the local virtual environment .venv from requirements*.txt.
# Research kits run as modules from this folder: make bench, or .venv/bin/python -m tools.<name> --help.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv test test-fast demo data bench clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "Python >= 3.10 is required"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
	touch $(STAMP)

test: venv
	$(PY) -m pytest -q tests

test-fast: venv
	$(PY) -m pytest -q -m "not slow" tests

demo: venv
	$(PY) demo.py --out runs/demo

data: venv
	$(PY) dataSegmentation.py --config configs/demo.yaml --synthetic --force

bench: venv
	$(PY) -m tools.benchmark

clean:
	rm -rf $(VENV) runs datasets/demo
