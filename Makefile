# Two entry points on a fresh machine:  `make quickstart`  and  `make test`.
# Both create .venv with the CPU build of torch (never a CUDA build) and install the project into it at the recorded,
# tested versions of constraints/locked.txt, so that a fresh machine gets the install the suite passed on.
#   make test-lowest   the lowest versions setup.cfg declares (constraints/lowest.txt), a fast subset of the suite
#   make test-latest   the newest release of every dependency, ignoring the declared upper bounds; the whole suite
#   make test-browser  the demo in headless Chromium (installs Debian's chromium and Playwright when missing)
#   make lock          rewrite constraints/locked.txt from .venv-latest (after test-latest passed)
PYTHON ?= python3
TORCH  ?= torch==2.13.0
PYTEST_ENV := HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TOKENIZERS_PARALLELISM=false
LOWEST_TESTS := tests/test_parity.py tests/test_modeling.py tests/test_pipelines.py \
	tests/test_pipelines_image_text_to_text.py tests/test_training_trainer.py tests/test_training_lora.py \
	tests/test_compile.py

.PHONY: install test test-all test-browser test-lowest test-latest lock quickstart clean

# $(call venv,DIR,PIP-ARGS): a virtualenv at DIR with the CPU torch and the project installed with PIP-ARGS
define venv
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install --quiet --upgrade pip
	$(1)/bin/python -m pip install --quiet $(TORCH)
	$(1)/bin/python -m pip install --quiet $(2)
	$(1)/bin/python -c "import transformers, diffusers, trl, peft; print('$(1):', 'transformers', transformers.__version__, 'diffusers', diffusers.__version__, 'trl', trl.__version__, 'peft', peft.__version__)"
	touch $(1)/.installed
endef

# (a variable: a comma written inside $(call ...) would split the argument)
LOCKED_INSTALL := -c constraints/locked.txt -e ".[test,browser]"

.venv/.installed: setup.cfg pyproject.toml constraints/locked.txt
	$(call venv,.venv,$(LOCKED_INSTALL))

.venv-lowest/.installed: setup.cfg pyproject.toml constraints/lowest.txt
	$(call venv,.venv-lowest,-c constraints/lowest.txt -e ".[test]")

install: .venv/.installed

test: .venv/.installed
	$(PYTEST_ENV) .venv/bin/python -m pytest tests

test-all: .venv/.installed
	$(PYTEST_ENV) .venv/bin/python -m pytest tests --run-slow

# The browser tests are opt-in in `make test` (they need Chromium, which is not a Python package): this target gets it.
test-browser: .venv/.installed
	.ci/chromium
	$(PYTEST_ENV) .venv/bin/python -m pytest tests/test_demo.py --run-browser -m browser

test-lowest: .venv-lowest/.installed
	$(PYTEST_ENV) .venv-lowest/bin/python -m pytest $(LOWEST_TESTS)

# Newest releases: the project without its pins, then every dependency upgraded past the declared upper bounds
# (torch stays the local CPU build). A failure here is the early warning that the next release breaks the package.
test-latest:
	rm -rf .venv-latest
	$(PYTHON) -m venv .venv-latest
	.venv-latest/bin/python -m pip install --quiet --upgrade pip
	.venv-latest/bin/python -m pip install --quiet $(TORCH)
	.venv-latest/bin/python -m pip install --quiet --no-deps -e .
	.venv-latest/bin/python -m pip install --quiet --upgrade $$(.venv-latest/bin/python .ci/requirements.py --unpinned --extra test --extra browser) "$(TORCH)"
	.venv-latest/bin/python .ci/requirements.py --report --extra test --extra browser
	.ci/chromium
	$(PYTEST_ENV) .venv-latest/bin/python -m pytest tests --run-browser

lock: .venv-latest/bin/python
	{ sed -n '1,2p' constraints/locked.txt; .venv-latest/bin/python -m pip freeze --exclude-editable | sed 's/+cpu$$//'; } > constraints/locked.txt.new
	mv constraints/locked.txt.new constraints/locked.txt

quickstart: .venv/.installed
	HF_HUB_OFFLINE=1 .venv/bin/python examples/quickstart.py

clean:
	rm -rf .venv .venv-lowest .venv-latest build *.egg-info
