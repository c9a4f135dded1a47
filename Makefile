# Everything a fresh machine needs: `make test` and `make demo` create .venv,
# install torch first (CPU build 2.13.0 unless TORCH=... says otherwise),
# then the project with its test extras.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.asrfx-installed

.PHONY: venv test test-all demo bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,demo]"
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

test-all: $(STAMP)
	$(PY) -m pytest -q -m "" tests

demo: $(STAMP)
	$(VENV)/bin/asrfx demo --out out/demo

bench: $(STAMP)
	$(PY) -m pytest bench --benchmark-only -q

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks
