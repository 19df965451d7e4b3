# One command each: `make demo` (set up + run the demo), `make test` (set up + run all tests).
# Both need nothing from the environment: `make test` runs the property tests derandomised
# (hypothesis profile `ci`) and the notebooks in their quick mode (INVARIANCE_QUICK=1, each in
# one to two minutes); `make notebooks-full` runs the notebooks in their full mode (about 25 minutes
# on 2 CPU cores). Tests that need MNIST / Fashion-MNIST files read them from INVARIANCE_DATA
# when it is set and are skipped, with the reason, when it is not. `make test` runs one pytest
# worker per core (pytest-xdist), each computing on one thread: two threads per worker would
# oversubscribe the cores, and torch's spinning threads then run several times slower. The notebooks
# (the longest items) come first, so that the short tests fill in behind them on both workers.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# `make test-models`: torchvision and timm need their own torch (requirements/models.txt)
MVENV  ?= .venv-models
MPY    := $(MVENV)/bin/python
MSTAMP := $(MVENV)/.installed

.PHONY: setup test test-fast test-models test-cluster demo lint notebooks notebooks-full bench clean

$(STAMP): pyproject.toml requirements/cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements/cpu.txt
	$(PY) -m pip install --quiet -e ".[dev,sweep]"
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check invariance stn tests benchmarks scripts notebooks
	HYPOTHESIS_PROFILE=$${HYPOTHESIS_PROFILE:-ci} INVARIANCE_QUICK=1 OMP_NUM_THREADS=1 \
	    $(PY) -m pytest -q -n auto notebooks/*.ipynb invariance stn tests --nbmake

$(MSTAMP): pyproject.toml requirements/models.txt
	$(PYTHON) -m venv $(MVENV)
	$(MPY) -m pip install --quiet --upgrade pip
	$(MPY) -m pip install --quiet -r requirements/models.txt
	$(MPY) -m pip install --quiet -e ".[models,sweep,dev]"
	touch $(MSTAMP)

# real architectures from torchvision and timm (random weights): frames and exact stride shifts
test-models: $(MSTAMP)
	HYPOTHESIS_PROFILE=$${HYPOTHESIS_PROFILE:-ci} $(MPY) -m pytest -q -p no:cacheprovider tests/test_real_networks.py

# the sweep on a real one-node Slurm: installs Debian's slurm-wlm and munge where missing (root),
# starts the controller and one node, runs tests/test_sweep_cluster.py through sbatch, stops them
SLURM_STATE ?= /tmp/invariance-slurm
test-cluster: $(MSTAMP)
	scripts/slurm_cluster.sh start $(SLURM_STATE) > /dev/null
	rc=0; PATH="$(SLURM_STATE)/bin:$$PATH" SLURM_CONF="$(SLURM_STATE)/slurm.conf" INVARIANCE_REQUIRE_SLURM=1 \
	    $(MPY) -m pytest -q -p no:cacheprovider tests/test_sweep_cluster.py || rc=$$?; \
	    scripts/slurm_cluster.sh stop $(SLURM_STATE); exit $$rc

test-fast: $(STAMP)
	$(PY) -m pytest -q -x invariance stn tests

demo: $(STAMP)
	$(VENV)/bin/invariance demo --out $${DEMO_OUT:-demo-report} $${DEMO_ARGS:-}

notebooks: $(STAMP)
	INVARIANCE_QUICK=1 $(PY) -m pytest -q notebooks/*.ipynb --nbmake

# the notebooks' full mode: more images, finer search grids, networks trained as in `stn reproduce --quick`
notebooks-full: $(STAMP)
	INVARIANCE_QUICK=0 $(PY) -m pytest -q notebooks/*.ipynb --nbmake --nbmake-timeout=3600

lint: $(STAMP)
	$(PY) -m ruff check invariance stn tests benchmarks scripts notebooks

bench: $(STAMP)
	$(PY) benchmarks/bench_search.py
	$(PY) benchmarks/bench_stn.py

clean:
	rm -rf $(VENV) $(MVENV) .pytest_cache .hypothesis demo-report
