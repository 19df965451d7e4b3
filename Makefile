# One command each: `make demo` (set up + run the demo), `make test` (set up + run all tests).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test test-fast demo lint notebooks bench clean

$(STAMP): pyproject.toml requirements/cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements/cpu.txt
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check invariance stn tests benchmarks scripts notebooks
	HYPOTHESIS_PROFILE=$${HYPOTHESIS_PROFILE:-ci} $(PY) -m pytest -q invariance stn tests notebooks/*.ipynb --nbmake

test-fast: $(STAMP)
	$(PY) -m pytest -q -x invariance stn tests

demo: $(STAMP)
	$(VENV)/bin/invariance demo --out $${DEMO_OUT:-demo-report} $${DEMO_ARGS:-}

lint: $(STAMP)
	$(PY) -m ruff check invariance stn tests benchmarks scripts notebooks

bench: $(STAMP)
	$(PY) benchmarks/bench_search.py
	$(PY) benchmarks/bench_stn.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis demo-report
