# The two commands of the README. Both create .venv and install the project into it first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup run test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,experiments,data]"
	touch $@

# the main job: the default experiment, a few minutes on a laptop CPU
run: setup
	$(PY) -m experiments default

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) -m experiments.bench_sampler

clean:
	rm -rf $(VENV) results .pytest_cache .hypothesis build dist *.egg-info
