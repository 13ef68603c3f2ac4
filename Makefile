# The verbs a newcomer types: `make demo` and `make test`. `make bench` for the figures.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
METHOD_VENV := .venv-method
ENVMGR := $(VENV)/bin/envmgr
DEMO_BASE ?= $(CURDIR)/.demo
# installers run quietly inside it: a line saying what, one every 10 s, then how long it took
TIMED := .ci/timed
# each test stage's junit report, read by the summary at the end of `make test`
REPORTS := .test-reports

.PHONY: help install method-venv host-tools engine demo dist test test-unit test-method test-integration test-installed \
	test-variants bench lint clean clean-reports record-layers

help:
	@echo "make demo   - engine up, base + sd-demo images, tiny SD3 model + sample dataset, a short CPU run"
	@echo "make test   - unit, trainer and integration tests (starts the Docker Engine if none answers)"
	@echo "make lint   - ruff, mypy and the import contracts (make test runs it first)"
	@echo "make dist   - dist/wheelhouse: envmgr's wheel + every dependency's, requirements.txt with hashes (offline install)"
	@echo "make bench  - benchmarks (figures for the closing notes)"
	@echo "make test-variants - build sd-demo's cu128 variant for real (~4 GB download; not in make test)"

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	@$(TIMED) "install: pip (upgrade) into $(VENV)" $(VENV)/bin/pip install -q --upgrade pip
	@$(TIMED) "install: envmgr (editable) and its dependencies with pytest, ruff, mypy into $(VENV)" \
	    $(VENV)/bin/pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

# The trainer's host venv: torch 2.13.0 (the CPU wheel on this machine's disk) + the locked pins.
$(METHOD_VENV)/.installed: envs/sd-demo/poetry.lock
	$(PYTHON) -m venv $(METHOD_VENV)
	@$(TIMED) "install: torch 2.13.0 (CPU) into $(METHOD_VENV) (about a minute)" $(METHOD_VENV)/bin/pip install -q torch==2.13.0
	@$(TIMED) "install: diffusers, transformers, peft, accelerate, safetensors, pillow, matplotlib, sentencepiece, \
	protobuf, pytest into $(METHOD_VENV)" \
	    $(METHOD_VENV)/bin/pip install -q diffusers==0.42.1 transformers==5.23.0 peft==0.21.2 accelerate==1.15.0 \
	    safetensors==0.8.0 pillow matplotlib sentencepiece protobuf pytest
	touch $@

method-venv: $(METHOD_VENV)/.installed

# Debian's docker.io (Engine 20.10), the base-image tools, docker-registry (the tests' registry), slurm-wlm + munge
# (the tests' one-node Slurm cluster) and squashfs-tools (enroot images), when missing.
host-tools:
	@if ! command -v dockerd >/dev/null || ! command -v debuerreotype-init >/dev/null || ! command -v docker-registry >/dev/null \
	    || ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null || ! command -v mksquashfs >/dev/null; then \
	    $(TIMED) "host-tools: apt-get update" apt-get update -qq \
	    && DEBIAN_FRONTEND=noninteractive $(TIMED) "host-tools: apt-get install docker.io debuerreotype debootstrap \
	docker-registry slurm-wlm munge squashfs-tools" sh -c 'apt-get install -y -qq docker.io debuerreotype debootstrap \
	    docker-registry slurm-wlm munge squashfs-tools >/dev/null'; \
	fi

# Use the engine that answers, or start the machine's one dockerd (never a second one).
engine: host-tools install
	@$(VENV)/bin/python -c "from tests.support.engine import ensure_engine; ensure_engine()" && echo "engine: up"

demo: engine
	ENVMGR_BASE_DIR=$(DEMO_BASE) $(VENV)/bin/python -m envmgr.face.demo

# ruff (pyflakes, bugbear, isort, complexity, style), mypy, and the import contracts (the stages import one
# way, no module loop: lint-imports) on envmgr/, configured in pyproject.toml.
lint: install
	$(VENV)/bin/ruff check envmgr
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-cache

test-unit: install
	$(VENV)/bin/python -m pytest tests/unit -q -rs --junitxml=$(REPORTS)/unit.xml

test-method: method-venv
	$(METHOD_VENV)/bin/python -m pytest tests/method -q -rs --junitxml=$(REPORTS)/method.xml

# -v names each test as it starts (some take minutes). The engine-stop fault test stops the machine's one dockerd
# (alone, after everything else, and it restarts it): only where asked for, ENVMGR_TEST_ENGINE_RESTART=1 (CI sets it).
test-integration: engine
	$(VENV)/bin/python -m pytest tests/integration -v -rs --junitxml=$(REPORTS)/integration.xml
	@if [ "$$ENVMGR_TEST_ENGINE_RESTART" = 1 ]; then \
	    echo "$(VENV)/bin/python -m pytest tests/integration -q -rs -m engine_restart"; \
	    $(VENV)/bin/python -m pytest tests/integration -q -rs -m engine_restart --junitxml=$(REPORTS)/engine-restart.xml; \
	else \
	    echo "test-integration: SKIPPED the engine-restart test: it stops and restarts this machine's dockerd (and"; \
	    echo "  every container on it). Opt in with: ENVMGR_TEST_ENGINE_RESTART=1 make test   (CI does)"; \
	fi

# The installed path: the wheelhouse installed with no index into a fresh venv outside the checkout, run from
# elsewhere (built-in methods found, inputs hashes equal to the checkout's, the commit named, and conda-demo
# built from the wheel with the checkout's image ID).
test-installed: engine dist
	ENVMGR_WHEELHOUSE=$(CURDIR)/$(DIST)/wheelhouse $(VENV)/bin/python -m pytest tests/installed -q -rs \
	    --junitxml=$(REPORTS)/installed.xml

# pytest removes its temp folders after a green run (pyproject.toml: tmp_path_retention_policy).
test: clean-reports lint test-unit test-method test-integration test-installed
	@$(VENV)/bin/python -m tests.support.summary $(REPORTS)

clean-reports:
	@rm -rf $(REPORTS)

# A wheelhouse that installs envmgr where no index answers:
#   pip install --no-index --find-links dist/wheelhouse -r dist/wheelhouse/requirements.txt
# Dependencies at the versions the tests ran with (.venv's pins). Another target platform:
#   make dist PLATFORM="manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64" PYTHON_VERSION=3.11
# The sdist beside it carries envs/ and images/ too.
DIST ?= dist
PLATFORM ?=
PYTHON_VERSION ?=
dist: install
	rm -rf build $(DIST)/wheelhouse $(DIST)/*.tar.gz
	mkdir -p $(DIST)
	$(VENV)/bin/pip freeze --exclude-editable > $(DIST)/venv-pins.txt
	$(VENV)/bin/python tools/wheelhouse.py $(DIST)/wheelhouse --constraints $(DIST)/venv-pins.txt \
	    $(foreach p,$(PLATFORM),--platform $(p)) $(if $(PYTHON_VERSION),--python-version $(PYTHON_VERSION))
	$(VENV)/bin/python -m build -q --sdist --outdir $(DIST) .

# sd-demo's documented variants built for real (cu128: torch 2.10 with 15 nvidia-*-cu12 wheels, ~4 GB to
# download into ENVMGR_TEST_CACHE): not part of `make test`. Prints the build's figures.
test-variants: engine
	$(VENV)/bin/python -m pytest tests/variants -q -s

bench: engine method-venv
	$(VENV)/bin/python -m tests.bench.core_bench
	$(VENV)/bin/python -m tests.bench.cold_build_bench
	$(VENV)/bin/python -m tests.bench.load_paths_bench
	$(VENV)/bin/python -m tests.bench.layers_bench
	$(VENV)/bin/python -m tests.bench.layer_facts_bench
	$(VENV)/bin/python -m tests.bench.conda_bench
	ENVMGR_BASE_DIR=$(DEMO_BASE) $(VENV)/bin/python -m tests.bench.run_bench
	$(VENV)/bin/python -m tests.bench.transfer_bench --gzip
	$(VENV)/bin/python -m tests.bench.wire_bench
	$(VENV)/bin/python -m tests.bench.slurm_bench
	$(VENV)/bin/python -m tests.bench.lock_bench
	$(METHOD_VENV)/bin/python envs/sd-demo/bench/bench_trainer.py
	$(METHOD_VENV)/bin/python envs/sd-demo/bench/bench_cache.py
	$(METHOD_VENV)/bin/python envs/sd-demo/bench/gpu_bench.py
	$(VENV)/bin/python -m tests.bench.first_build_summary

# sd-demo's environment layer digests (envs/sd-demo/env-layers.json), compared by its integration test.
# Run after a lock or layout change and commit the record with it (builds the layers when missing: minutes).
record-layers: engine
	$(VENV)/bin/python -m envmgr.build.layer_record sd-demo

clean:
	rm -rf $(VENV) $(METHOD_VENV) .demo build $(DIST) $(REPORTS)
