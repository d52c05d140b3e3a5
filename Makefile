# The two commands a new user runs (see README):
#   make demo   - set up .venv, then run the main job on the built-in default
#   make test   - set up .venv, then run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rematch-installed

.PHONY: demo test install browser bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: a CPU build on this kind of machine, never a surprise CUDA download
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rematch demo

# Headless Chromium for the search page's browser test (Debian packages; skipped with a reason
# where it cannot be installed, e.g. without root or apt).
browser:
	@{ command -v chromium && command -v chromedriver; } >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else echo "chromium not found and cannot be installed here: the search-page browser test will be skipped"; fi; }

# One torch thread: the tiny test models gain nothing from two, and two threads on a 2-core
# machine stall ~20x whenever another process holds a core (benchmarks/RESULTS.md).
test: $(STAMP) browser
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/bench_encode.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
