# Entry points (README): `make bench` (the main job), `make demo` and `make test`. Each sets up .venv first
# (--no-compile: Python byte-compiles the modules it imports, not all of torch's at install time).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup bench demo test lint

setup: $(VENV)/.installed

$(VENV)/.installed: requirements-cpu.txt pyproject.toml setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile -r requirements-cpu.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

bench: setup
	$(VENV)/bin/fastattn-bench e2e --quick --out bench-results --plot bench-results

demo: setup
	$(PY) benchmarks/bench_attention.py

test: setup
	$(VENV)/bin/ruff check fastattn tests benchmarks tools
	$(VENV)/bin/ruff format --check fastattn tests benchmarks tools
	TRITON_INTERPRET=1 $(PY) -m pytest -q -p no:cacheprovider -n 2 --dist worksteal tests
