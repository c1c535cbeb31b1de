# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv as needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo
ARGS ?=

.PHONY: demo test docs bench clean

# The demo needs the library alone; the tests add the linters and the docs builder.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	$(PY) -m experiments.demo --workdir $(WORKDIR) $(ARGS)

test: $(VENV)/.installed-test
	$(VENV)/bin/ruff check attrjax experiments benchmarks tests
	$(VENV)/bin/mypy
	$(PY) -m pytest -q -n 2 --dist worksteal

docs: $(VENV)/.installed-test
	$(PY) -m mkdocs build --strict
	@echo "the API reference: site/index.html"

bench: $(VENV)/.installed
	$(PY) -m benchmarks.train_step
	$(PY) -m benchmarks.attribution
	$(PY) -m benchmarks.evaluation
	$(PY) -m benchmarks.input_pipeline

clean:
	rm -rf $(VENV) runs site
