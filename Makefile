# Two commands do everything on a fresh machine:
#   make run    set up, then start the node on its embedded defaults
#   make test   set up (Python packages and the Debian peers the tests use), then run every test
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test setup system-deps bench bench-workers clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: a CPU build, so that nothing pulls the CUDA packages
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

system-deps:
	bash scripts/install-system-deps

run: setup
	$(VENV)/bin/dicomnode serve $(ARGS)

test: setup system-deps
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup system-deps
	$(PY) bench/ingest.py $(BENCH_ARGS)

# remote workers (Celery on Redis): studies/min with 1, 2, 4 workers; BENCH_ARGS=--smoke
bench-workers: setup system-deps
	$(PY) bench/workers.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) dicomnode-data .pytest_cache
