# Two commands do everything on a fresh machine:
#   make run    set up, then start the node on its embedded defaults
#   make test   set up (Python packages and the Debian peers the tests use), then run every test
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test setup system-deps viewer viewer-if-npm bench bench-workers clean conformance

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: a CPU build, so that nothing pulls the CUDA packages
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	# the GPL-3.0 decoder an older set-up installed is not used any more (dicomnode/core/decoders.py)
	$(PY) -m pip uninstall --quiet --yes pylibjpeg-libjpeg 2>/dev/null || true
	touch $(STAMP)

setup: $(STAMP)

system-deps:
	bash scripts/install-system-deps

# OHIF at /viewer/: the pinned, integrity-checked @ohif/app dist (scripts/install-viewer)
viewer:
	bash scripts/install-viewer

# run/test install the viewer where npm exists; elsewhere they say how and go on
viewer-if-npm:
	@if command -v npm >/dev/null 2>&1; then bash scripts/install-viewer || \
	     echo "warning: OHIF was not installed (see above); the node runs without /viewer/"; \
	else echo "note: npm not found, so OHIF is not installed (the node runs without /viewer/);"; \
	     echo "      to add it: sudo apt-get install nodejs npm && make viewer"; fi

run: setup viewer-if-npm
	$(VENV)/bin/dicomnode serve $(ARGS)

test: setup system-deps viewer-if-npm
	$(PY) -m mypy
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup system-deps
	$(PY) bench/ingest.py $(BENCH_ARGS)

conformance: setup
	$(PY) -m dicomnode.conformance --write

# remote workers (Celery on Redis): studies/min with 1, 2, 4 workers; BENCH_ARGS=--smoke
bench-workers: setup system-deps
	$(PY) bench/workers.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) dicomnode-data .pytest_cache
