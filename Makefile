# Two entry points on a fresh machine:  `make quickstart`  and  `make test`.
# Both create .venv with the CPU build of torch (never a CUDA build) and install the project into it.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test test-all quickstart clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 $(PY) -m pytest tests

test-all: $(STAMP)
	HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 $(PY) -m pytest tests --run-slow

quickstart: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) examples/quickstart.py

clean:
	rm -rf $(VENV) build *.egg-info
