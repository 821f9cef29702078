# ExpBuild developer entry points. Every target creates the virtualenv it needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip

.PHONY: venv test run proto lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[test,dev]'
	touch $@

venv: $(VENV)/.installed

## test: run the whole suite against a real PostgreSQL (see tests/conftest.py for how one is found)
test: venv
	$(PY) -m pytest -q

## run: embedded Postgres + server on 127.0.0.1:8980 + one local worker, in the foreground
run: venv
	$(VENV)/bin/expbuild up --workers 1

## proto: regenerate the committed Python stubs from expbuild/proto/*.proto
proto: venv
	$(PY) -m expbuild.proto.generate

lint: venv
	$(VENV)/bin/ruff check expbuild tests bench
	$(VENV)/bin/ruff format --check expbuild tests bench

bench: venv
	$(PY) bench/queue_throughput.py
	$(PY) bench/execute_latency.py

clean:
	rm -rf $(VENV) .pytest_cache
