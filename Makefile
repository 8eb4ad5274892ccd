# Two commands matter on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: run test lint bench venv clean diagrams

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,bench]'
	touch $@

run: venv
	$(BIN)/icap-gateway serve $(ARGS)

lint: venv
	$(BIN)/ruff check gateway register monitoring tests benchmarks
	$(BIN)/mypy

test: venv lint
	$(BIN)/pytest $(PYTEST_ARGS)

bench: venv
	$(BIN)/python -m benchmarks $(ARGS)

# The README's pictures, from their text sources (Graphviz: Debian's graphviz).
diagrams: docs/farm.png

docs/farm.png: docs/farm.dot
	dot -Tpng -Gdpi=96 $< -o $@

clean:
	rm -rf $(VENV) var .pytest_cache
