# The two set-up commands: `make demo` (main job on the built-in corpus) and `make test`.
# Both create the virtualenv and install the pinned dependencies on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/kforcing-dist
RUN ?= runs/demo
CONFIG ?= configs/demo.yaml
PYTEST_ARGS ?=

.PHONY: setup demo test lint smoke config-docs clean

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(CLI) pipeline -c $(CONFIG) -o $(RUN)

smoke: setup
	$(CLI) pipeline -c configs/smoke.yaml -o runs/smoke

test: setup lint
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

lint: setup
	$(VENV)/bin/ruff check kforcing_dist tests bench tools

config-docs: setup
	$(PY) -m kforcing_dist.config.reference --update docs/config.md

clean:
	rm -rf runs .pytest_cache
