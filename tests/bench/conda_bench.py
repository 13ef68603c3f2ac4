"""Benchmarks for conda methods. Prints a table and writes bench-results/conda.json.

The test environment is envs/conda-demo (python, a tool per platform, a noarch package, a noarch
python package and two pip packages), locked for linux-64 + linux-aarch64 against the test channel
(tests/support/conda_channel.py) and the test PyPI index, both served on 127.0.0.1:
  - `envmgr lock` wall time, cold (empty cache: repodata fetched) and warm
  - install of the lock into an env prefix (rattler link + uv for the pip part), cold (empty
    package caches) and warm
  - no-op `envmgr build` of the conda method (goal <= 1 s)
Run: `make bench` (or `.venv/bin/python -m tests.bench.conda_bench`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "bench-results"
NAME = "conda-bench"


def main() -> int:
    from envmgr.core.config import load_config
    from envmgr.core.spec import find_method
    from envmgr.core.ui import Reporter
    from envmgr.door.context import Context
    from envmgr.images.base import ensure_base
    from envmgr.lock.backends.conda import CondaBackend
    from tests.support.conda_channel import CHANNEL, Channel, build_channel, build_example_wheels
    from tests.support.pypi import Index

    work = Path(tempfile.mkdtemp(prefix="envmgr-conda-bench-", dir="/var/tmp"))
    store = Path(os.environ.get("ENVMGR_BENCH_CACHE", "/var/tmp/envmgr-bench-cache")) / "store"
    build_channel(work / "channel")
    build_example_wheels(work / "wheels")
    channel, pypi = Channel(work / "channel").start(), Index(work / "wheels").start()
    method = work / "base" / "methods" / NAME
    shutil.copytree(REPO / "envs" / "conda-demo", method, ignore=shutil.ignore_patterns("conda-lock.yml"))
    (method / "envmgr.toml").write_text((method / "envmgr.toml").read_text().replace('"conda-demo"', f'"{NAME}"'))
    config = work / "config.toml"
    config.write_text(f'[mirrors]\nchannels = {{ "{CHANNEL}" = "{channel.url}" }}\npypi = "{pypi.url}"\n')
    cache = work / "cache"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("ENVMGR_")},
           "ENVMGR_BASE_DIR": str(work / "base"), "ENVMGR_CACHE_DIR": str(cache),
           "ENVMGR_STORE_DIR": str(store), "ENVMGR_CONFIG": str(config)}

    def envmgr(*args: str) -> float:
        started = time.monotonic()
        subprocess.run([sys.executable, "-m", "envmgr", *args], env=env, check=True, cwd=REPO,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.monotonic() - started

    results: dict[str, float] = {}
    try:
        os.environ.update({k: v for k, v in env.items() if k.startswith("ENVMGR_")})
        ctx = Context(load_config(files=[config]), Reporter("plain"))
        base = ensure_base(ctx, "bookworm-py311")   # built once, outside the figures
        results["lock_cold_s"] = round(envmgr("lock", NAME, "--regenerate"), 2)
        results["lock_warm_s"] = round(min(envmgr("lock", NAME, "--regenerate") for _ in range(3)), 2)

        spec = find_method(NAME, work / "base")
        backend = CondaBackend()
        for label in ("cold", "warm", "warm"):
            if label == "cold":
                shutil.rmtree(cache / "conda" / "pkgs", ignore_errors=True)
                shutil.rmtree(cache / "uv", ignore_errors=True)
            prefix = Path(tempfile.mkdtemp(dir=work, prefix="prefix-"))
            started = time.monotonic()
            backend.install(ctx, spec, base, prefix)
            seconds = round(time.monotonic() - started, 2)
            key = f"install_{label}_s"
            results[key] = min(results.get(key, seconds), seconds)
            shutil.rmtree(prefix)

        envmgr("build", NAME)   # the image exists from here on
        results["noop_build_s"] = round(min(envmgr("build", NAME) for _ in range(3)), 3)
    finally:
        import docker

        client = docker.from_env()
        for image in client.images.list(name=f"envmgr/{NAME}"):
            client.images.remove(image.id, force=True)
        channel.stop()
        pypi.stop()
        shutil.rmtree(work, ignore_errors=True)
    OUT.mkdir(exist_ok=True)
    (OUT / "conda.json").write_text(json.dumps(results, indent=1))
    for key, value in results.items():
        print(f"{key:>16}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
