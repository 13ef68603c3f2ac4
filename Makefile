# The verbs a newcomer types: `make demo` and `make test`. `make bench` for the figures.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
METHOD_VENV := .venv-method
ENVMGR := $(VENV)/bin/envmgr
DEMO_BASE ?= $(CURDIR)/.demo

.PHONY: help install method-venv host-tools engine demo test test-unit test-method test-integration test-variants bench lint clean record-layers

help:
	@echo "make demo   - engine up, base + sd-demo images, tiny SD3 model + sample dataset, a short CPU run"
	@echo "make test   - unit, trainer and integration tests (starts the Docker Engine if none answers)"
	@echo "make lint   - ruff and mypy (make test runs it first)"
	@echo "make bench  - benchmarks (figures for the closing notes)"
	@echo "make test-variants - build sd-demo's cu128 variant for real (~4 GB download; not in make test)"

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

# The trainer's host venv: torch 2.13.0 (the CPU wheel on this machine's disk) + the locked pins.
$(METHOD_VENV)/.installed: envs/sd-demo/poetry.lock
	$(PYTHON) -m venv $(METHOD_VENV)
	$(METHOD_VENV)/bin/pip install -q torch==2.13.0
	$(METHOD_VENV)/bin/pip install -q diffusers==0.42.1 transformers==5.23.0 peft==0.21.2 accelerate==1.15.0 \
	    safetensors==0.8.0 pillow matplotlib sentencepiece protobuf pytest
	touch $@

method-venv: $(METHOD_VENV)/.installed

# Debian's docker.io (Engine 20.10), the base-image tools, docker-registry (the tests' registry), slurm-wlm + munge
# (the tests' one-node Slurm cluster) and squashfs-tools (enroot images), when missing.
host-tools:
	@if ! command -v dockerd >/dev/null || ! command -v debuerreotype-init >/dev/null || ! command -v docker-registry >/dev/null \
	    || ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null || ! command -v mksquashfs >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io debuerreotype debootstrap docker-registry \
	    slurm-wlm munge squashfs-tools >/dev/null; \
	fi

# Use the engine that answers, or start the machine's one dockerd (never a second one).
engine: host-tools install
	@$(VENV)/bin/python -c "from tests.support.engine import ensure_engine; ensure_engine()" && echo "engine: up"

demo: engine
	ENVMGR_BASE_DIR=$(DEMO_BASE) $(VENV)/bin/python -m envmgr.demo

# ruff (pyflakes, bugbear, isort, complexity, style) and mypy on envmgr/, configured in pyproject.toml.
lint: install
	$(VENV)/bin/ruff check envmgr
	$(VENV)/bin/mypy

test-unit: install
	$(VENV)/bin/python -m pytest tests/unit -q

test-method: method-venv
	$(METHOD_VENV)/bin/python -m pytest tests/method -q

# The engine-stop fault test stops the machine's one dockerd: alone, after everything else, and it restarts it.
test-integration: engine
	$(VENV)/bin/python -m pytest tests/integration -q
	$(VENV)/bin/python -m pytest tests/integration -q -m engine_restart

test: lint test-unit test-method test-integration

# sd-demo's documented variants built for real (cu128: torch 2.10 with 15 nvidia-*-cu12 wheels, ~4 GB to
# download into ENVMGR_TEST_CACHE): not part of `make test`. Prints the build's figures.
test-variants: engine
	$(VENV)/bin/python -m pytest tests/variants -q -s

bench: engine method-venv
	$(VENV)/bin/python -m tests.bench.core_bench
	$(VENV)/bin/python -m tests.bench.layers_bench
	$(VENV)/bin/python -m tests.bench.conda_bench
	ENVMGR_BASE_DIR=$(DEMO_BASE) $(VENV)/bin/python -m tests.bench.run_bench
	$(VENV)/bin/python -m tests.bench.transfer_bench --gzip
	$(VENV)/bin/python -m tests.bench.wire_bench
	$(VENV)/bin/python -m tests.bench.slurm_bench
	$(METHOD_VENV)/bin/python envs/sd-demo/bench/bench_trainer.py
	$(METHOD_VENV)/bin/python envs/sd-demo/bench/bench_cache.py
	$(METHOD_VENV)/bin/python envs/sd-demo/bench/gpu_bench.py

# sd-demo's environment layer digests (envs/sd-demo/env-layers.json), compared by its integration test.
# Run after a lock or layout change and commit the record with it (builds the layers when missing: minutes).
record-layers: engine
	$(VENV)/bin/python -m envmgr.layer_record sd-demo

clean:
	rm -rf $(VENV) $(METHOD_VENV) .demo
