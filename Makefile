# The two commands a new user needs: `make demo` and `make test`.
# Both create .venv on first use and install the project with its test tools.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-ops lint typecheck unit bench clean host-tools

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

demo: $(STAMP) host-tools
	$(BIN)/python -m intrahost.demo

lint: $(STAMP)
	$(BIN)/ruff check intrahost tests bench
	$(BIN)/ruff format --check intrahost tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

# Host programs the tests use (ip, ping, qemu-system-x86_64): installed when missing, if it can.
host-tools:
	@sh contrib/host-tools

unit: $(STAMP) host-tools
	$(BIN)/pytest

test: lint typecheck unit

# The operations tests: the fleet upgrade play of docs/operations.md with ansible-core.
test-ops: $(STAMP) host-tools
	$(BIN)/pytest -m ops

bench: $(STAMP)
	$(BIN)/python bench/exits.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
