# The README's two commands: `make demo` and `make test`. Both build .venv first if needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
BIN := $(VENV)/bin
DEMO_DIR ?= data/demo
DEMO_FRAMES ?= 1800
DEMO_SIZE ?= 48

.PHONY: install test test-fast durations demo serve bench clean

install: $(VENV)/.installed

# Re-installs only when pyproject.toml changes. torch comes first so pip takes the local wheels.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch torchvision
	$(PIP) install -q -e '.[test]'
	touch $@

# One pytest-xdist worker per core plus one, one thread each (tiny models: two threads per worker on two
# cores only spin; part of the suite's time is spent waiting on servers, subprocesses and heartbeats,
# which the extra worker fills: docs/benchmarks.md, the suite's time), a test file per worker at a time (its module fixtures are
# built once), the longest files first (by their recorded durations: tests/conftest.py), and the slowest
# tests listed at the end.
WORKERS ?= $(shell $(PYTHON) -c "import os; print(len(os.sched_getaffinity(0)) + 1)")
PYTEST := HF_HUB_OFFLINE=1 MPLBACKEND=Agg OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(WORKERS) --dist loadfile \
	--no-loadscope-reorder --durations=20

test: install
	$(PYTEST)

# Everything but the pipeline tests (marked slow).
test-fast: install
	$(PYTEST) -m "not slow"

# The seconds per test file that the last full `make test` here measured, into the committed
# tests/durations.json (the order a fresh clone runs the files in).
durations:
	$(PY) -c "import json, pathlib; c = pathlib.Path('.pytest_cache/v/flame_kd/file_seconds'); \
	d = pathlib.Path('tests/durations.json'); s = json.loads(d.read_text()); s.update(json.loads(c.read_text())); \
	d.write_text(json.dumps(dict(sorted(s.items(), key=lambda kv: -kv[1])), indent=1) + '\n')"

demo: install
	HF_HUB_OFFLINE=1 MPLBACKEND=Agg PATH="$(abspath $(BIN)):$$PATH" bash experiments/demo.sh "$(DEMO_DIR)" "$(DEMO_FRAMES)" "$(DEMO_SIZE)"

# The newest flame-kd-student aliased champion (make demo's KD student) or pareto-best, on loopback;
# SERVE_ARGS="--model-uri models:/flame-kd-student/3 --port 5002" picks another model or port.
serve: install
	HF_HUB_OFFLINE=1 $(BIN)/flame-kd serve $(SERVE_ARGS)

bench: install
	HF_HUB_OFFLINE=1 $(PY) bench/data_loading.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) mlflow.db mlflow.db.lock optuna.db mlruns mlartifacts
