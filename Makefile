# make demo: venv + install + the quickstart sweep; make test: the test suite; make ui: MLflow on 127.0.0.1.
VENV ?= .venv
PY := $(VENV)/bin/python
LAB := $(VENV)/bin/lab
PORT ?= 5000
# This machine's pip serves these from its disk; elsewhere any torch>=2.4 with its torchvision works.
TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test test-fast test-lowest lint ui dashboard bench bench-gpu clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: install
	$(LAB) sweep sweeps/quickstart.yaml --workers 2
	$(LAB) best sweeps/quickstart.yaml

# Three test processes, a file each at a time, on 2 cores: the SLURM, server and outage files spend minutes
# waiting on daemons with little CPU, and a third process keeps both cores busy meanwhile (docs/development.md).
TEST_PROCESSES ?= 3

test: install
	$(PY) -m pytest -q -n $(TEST_PROCESSES) --dist loadfile --no-loadscope-reorder --durations=30

test-fast: install
	$(PY) -m pytest -q -n $(TEST_PROCESSES) --dist loadfile --no-loadscope-reorder -m "not slow"

# The fast tests on the lowest versions pyproject.toml declares for Optuna and MLflow (whose private names
# lab/private.py holds), in a venv of their own; `make test-fast` runs them on the highest that install.
LOWEST ?= 'optuna==5.0.0' 'mlflow[auth]==3.11.1'
LOWEST_VENV ?= .venv-lowest

test-lowest:
	test -x $(LOWEST_VENV)/bin/python || python3 -m venv $(LOWEST_VENV)
	$(LOWEST_VENV)/bin/python -c "import torch, torchvision" 2>/dev/null || $(LOWEST_VENV)/bin/python -m pip install -q $(TORCH)
	$(LOWEST_VENV)/bin/python -m pip install -q -e '.[test]' $(LOWEST)
	$(LOWEST_VENV)/bin/python -c "import optuna, mlflow; print('optuna', optuna.__version__, 'mlflow', mlflow.__version__)"
	$(LOWEST_VENV)/bin/python -m pytest -q -n $(TEST_PROCESSES) --dist loadfile --no-loadscope-reorder -m "not slow"

lint: install
	$(VENV)/bin/ruff check src tests bench

ui: install
	$(VENV)/bin/mlflow ui --host 127.0.0.1 --port $(PORT) --backend-store-uri $${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db}

dashboard: install
	$(PY) -m pip install -q optuna-dashboard
	$(VENV)/bin/optuna-dashboard --host 127.0.0.1 runs/quickstart/study.journal

bench: install
	$(PY) bench/run.py

bench-gpu: install
	$(PY) bench/run.py --gpu

clean:
	rm -rf outputs runs mlflow.db mlartifacts
