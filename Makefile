# The two commands of the README (run, test) and the development targets. Every target
# creates .venv and installs the project into it first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LINTED := adambs_jax tests experiments

.PHONY: setup run test test-fast lint typecheck bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,experiments,data]"
	touch $@

# the main job: the default experiment, a few minutes on a laptop CPU
run: setup
	$(PY) -m experiments default

# every test, serially
test: setup
	$(PY) -m pytest -q

# the fast tier: every test not marked slow, on 2 workers (pytest-xdist)
test-fast: setup
	$(PY) -m pytest -m "not slow" -n 2 -q

lint: setup
	$(PY) -m ruff check $(LINTED)
	$(PY) -m ruff format --check $(LINTED)

# pyright, configured in pyproject.toml ([tool.pyright]: adambs_jax, basic mode); -p . keeps
# it from taking a pyrightconfig.json found in a parent folder
typecheck: setup
	$(PY) -m pyright -p .

bench: setup
	$(PY) -m experiments.bench_sampler

clean:
	rm -rf $(VENV) results .pytest_cache .hypothesis build dist *.egg-info
