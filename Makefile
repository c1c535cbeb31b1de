# Two commands on a fresh machine: `make demo` and `make test`. Each creates .venv as needed.
#
# .venv runs the newest supported JAX, which needs Python 3.12 or newer: make takes the first of python3.12,
# python3.13 and pyenv's 3.12 / 3.13 that runs (or PYTHON=/path/to/python3.12). `make test-oldest` checks the oldest
# supported versions (ci/oldest.txt) on Python 3.11 in .venv-oldest.
# $(call first_python,CANDIDATES,CONDITION): the first interpreter among CANDIDATES that runs and for which
# CONDITION holds, a Python expression of `version` (major * 100 + minor, e.g. 312).
first_python = $(firstword $(foreach p,$(1),$(shell $(p) -c 'import sys; version = sys.version_info.major * 100 \
    + sys.version_info.minor; ($(2)) and print("$(p)")' 2>/dev/null)))
PYENV_VERSIONS := $(HOME)/.pyenv/versions
ifndef PYTHON
PYTHON := $(call first_python,python3.12 python3.13 $(wildcard $(PYENV_VERSIONS)/3.12*/bin/python3) \
    $(wildcard $(PYENV_VERSIONS)/3.13*/bin/python3),version >= 312)
endif
ifndef PYTHON_OLDEST
PYTHON_OLDEST := $(call first_python,python3.11 $(wildcard $(PYENV_VERSIONS)/3.11*/bin/python3),version == 311)
endif
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo
ARGS ?=

.PHONY: demo test test-oldest docs bench clean

# The demo needs the library alone; the tests add the linters and the docs builder. A venv of another Python (an
# older checkout's 3.11) is replaced.
$(VENV)/.installed: pyproject.toml
	@test -n "$(PYTHON)" || { echo "make needs Python 3.12 or newer: set PYTHON=/path/to/python3.12"; exit 1; }
	@$(PY) -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null || { rm -rf $(VENV); $(PYTHON) -m venv $(VENV); }
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

# The oldest supported versions on Python 3.11: install, import, and the tests marked `oldest` (a minute).
test-oldest: .venv-oldest/.installed
	.venv-oldest/bin/python -m pytest -q -n 2 -m oldest

.venv-oldest/.installed: pyproject.toml ci/oldest.txt
	@test -n "$(PYTHON_OLDEST)" || { echo "make test-oldest needs Python 3.11: set PYTHON_OLDEST=/path/to/python3.11"; exit 1; }
	rm -rf .venv-oldest && $(PYTHON_OLDEST) -m venv .venv-oldest
	.venv-oldest/bin/python -m pip install -q -c ci/oldest.txt -e . "pytest>=8,<10" "pytest-xdist>=3.6,<4"
	touch $@

docs: $(VENV)/.installed-test
	$(PY) -m mkdocs build --strict
	@echo "the API reference: site/index.html"

bench: $(VENV)/.installed
	$(PY) -m benchmarks.train_step
	$(PY) -m benchmarks.attribution
	$(PY) -m benchmarks.evaluation
	$(PY) -m benchmarks.input_pipeline

clean:
	rm -rf $(VENV) .venv-oldest runs site
