# The two README commands: `make demo` (set up + the main job) and `make test` (set up + the test suite).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test data browser clean

setup: $(VENV)/.installed

# torch is pinned and installed first: an unpinned torch pulls the multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[test,quant]"
	touch $@

data: setup
	PYTHON=$(PY) bash scripts/install_data.sh smollm2-135m minilm-l6

# headless Chromium from Debian's packages, for the test that opens the bench's HTML report
browser:
	bash scripts/install_browser.sh

demo: data
	$(PY) -m peftlab.demo

test: data browser
	$(PY) -m pytest

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
