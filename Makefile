# cloudhpc: the two commands a new user needs are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint unit integration testbed-up testbed-down testbed-status venv clean bench bench-topology faults

$(STAMP): pyproject.toml
	@echo "==> creating $(VENV) and installing cloudhpc with its test extras"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

venv: $(STAMP)

## demo: the cloud-HPC pipeline on the embedded default (serve all + local cluster + a local MLflow);
## `make demo CLUSTER=testbed` runs it against the SLURM testbed (brought up first)
CLUSTER ?= local
demo: $(STAMP)
	@if [ "$(CLUSTER)" = testbed ]; then bash scripts/testbed.sh up; fi
	@$(VENV)/bin/cloudhpc demo --cluster $(CLUSTER)

## test: install, bring up the real testbed while linting and type-checking (a cold mypy and a
## cold testbed each take minutes, mostly on different resources), then run every test tier
test: $(STAMP)
	@$(MAKE) --no-print-directory -j2 testbed-up lint
	@$(PY) -m pytest -q -p no:cacheprovider --durations=25 tests

lint: $(STAMP)
	@echo "==> ruff"
	@$(VENV)/bin/ruff check src tests bench
	@$(VENV)/bin/ruff format --check src tests bench
	@echo "==> mypy"
	@$(VENV)/bin/mypy

unit: $(STAMP)
	@$(PY) -m pytest -q tests/unit

integration: $(STAMP) testbed-up
	@$(PY) -m pytest -q tests/integration

testbed-up:
	@bash scripts/testbed.sh up

testbed-down:
	@bash scripts/testbed.sh down

testbed-status:
	@bash scripts/testbed.sh status

bench: $(STAMP) testbed-up
	@for b in bench/*.py; do [ "$$b" = bench/topology_mode.py ] && continue; echo "==> $$b"; $(PY) $$b || exit 1; done

## bench-topology: the benches that cross hosts, on the multi-host topology with its link latency
bench-topology: $(STAMP) testbed-up
	@for b in slurm_submit dispatch ray_bridge pipeline; do echo "==> bench/$$b.py --topology"; $(PY) bench/$$b.py --topology || exit 1; done

## faults: the long fault-injection run on the topology (docs/reliability.md): FAULTS_JOBS jobs (200; arrays
## among them, FAULTS_BRIDGES (3) with bridges), every fault kind of FAULTS_KINDS (all) FAULTS_PER_KIND times (2)
## at points chosen by FAULTS_SEED (1), slurmctld and slurmdbd down FAULTS_DOWN_FOR s (120)
faults: $(STAMP) testbed-up
	@$(PY) -m tests.faults.driver

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
