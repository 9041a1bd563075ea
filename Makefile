# Developer entry points. Everything runs from the project venv in .venv, created on demand.

# Python 3.11+ preferred; plain python3 as the fallback (pyproject.toml checks the version).
PYTHON ?= $(shell command -v python3.11 || command -v python3.12 || command -v python3.13 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: install demo test test-fast test-deep lint bench clean distclean

install: $(VENV)/.installed

# Re-installs whenever pyproject.toml changes; pip uses the machine's own index config.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/flowctl demo

test: $(VENV)/.installed
	$(BIN)/pytest $(PYTEST_ARGS)

# make test without the model test's time-bounded random exploration.
test-fast: $(VENV)/.installed
	FLOW_MODEL_PROFILE=fast $(BIN)/pytest $(PYTEST_ARGS)

# The model test's long exploration on PostgreSQL (FLOW_MODEL_BUDGET_S, docs/testing.md).
test-deep: $(VENV)/.installed
	FLOW_MODEL_PROFILE=deep $(BIN)/pytest tests/faults/test_model.py -k deep $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	# mypy skips tests/: collecting them catches a test importing a name that moved.
	$(BIN)/pytest --collect-only -q > /dev/null

bench: $(VENV)/.installed
	$(BIN)/python -m bench.run

clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis \
		.tmp_services bench/.work bench/quick
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) .flow_home
