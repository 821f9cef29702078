# ExpBuild developer entry points. Every target creates the virtualenv it needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
ADDRESS ?= 127.0.0.1:8980

.PHONY: venv venv-buildstream test run proto lint bench clean images

# What running needs (`make run`); the test and dev extras come on top for everything else.
$(VENV)/.runtime: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e .
	touch $@

$(VENV)/.installed: $(VENV)/.runtime
	$(PIP) install --quiet -e '.[test,dev]'
	touch $@

venv: $(VENV)/.installed

## venv-buildstream: BuildStream for tests/test_buildstream.py, in a venv of its own
BST_VENV ?= .venv-buildstream
$(BST_VENV)/.installed: tests/buildstream/requirements.txt
	$(PYTHON) -m venv $(BST_VENV)
	$(BST_VENV)/bin/pip install --quiet -r tests/buildstream/requirements.txt
	touch $@

venv-buildstream: $(BST_VENV)/.installed

## test: run the whole suite against a real PostgreSQL (see tests/conftest.py for how one is found)
test: venv
	$(PY) -m pytest -q

## run: embedded Postgres + server on $(ADDRESS) (127.0.0.1:8980) + one local worker, in the foreground
# Says once when a worker is online (the server answers and has somewhere to run actions);
# Ctrl+C or a TERM to make stops everything.
run: $(VENV)/.runtime
	@$(VENV)/bin/expbuild up --workers 1 --address $(ADDRESS) & up=$$!; \
	trap 'kill -TERM $$up 2>/dev/null; wait $$up; exit 130' INT TERM; \
	until $(VENV)/bin/expbuild workers list --server $(ADDRESS) --json 2>/dev/null | grep -q '"online"'; do \
		kill -0 $$up 2>/dev/null || { wait $$up; exit $$?; }; sleep 0.5; \
	done; \
	echo "ExpBuild is ready on $(ADDRESS); try: $(VENV)/bin/expbuild run $(if $(filter 127.0.0.1:8980,$(ADDRESS)),,--server $(ADDRESS) )-- echo hello"; \
	wait $$up

## proto: regenerate the committed Python stubs from expbuild/proto/*.proto
proto: venv
	$(PY) -m expbuild.proto.generate

lint: venv
	$(VENV)/bin/ruff check expbuild tests bench
	$(VENV)/bin/ruff format --check expbuild tests bench
	$(VENV)/bin/mypy

## bench: issue #10's figures: its own "today" and goal, then today's code (BASELINE: main
## before #10) and this tree's measured side by side in this run; then the queue against
## the bare SKIP LOCKED loop
BASELINE ?= 783a216
bench: venv
	$(PY) bench/noop_load.py --baseline $(BASELINE) --code . --server-processes 1 --server-processes 2
	$(PY) bench/queue_throughput.py --rounds 3
	$(PY) bench/round_trips.py --baseline $(BASELINE) --code .
	$(PY) bench/round_trips.py --baseline $(BASELINE) --code . --clients 8 --actions 200
	$(PY) bench/queue_throughput.py
	$(PY) bench/execute_latency.py

## images: expbuild, expbuild-postgres, expbuild-haproxy, expbuild-prometheus from Debian packages
images:
	docker/build.sh

clean:
	rm -rf $(VENV) $(BST_VENV) .pytest_cache
