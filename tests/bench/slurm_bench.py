"""Benchmark for `envmgr run --on slurm` (issue: beyond one server). Prints figures and writes
bench-results/slurm.json.

  - submission overhead: from the start of `envmgr run` to the moment the method's container starts
    (the method prints time.time() as its first line), through the one-node loopback Slurm cluster,
    against the same for a local run of the same method; goal: under 2 s more than local
Uses a one-package fixture method on a loopback PyPI index (no network) and the tests' base-image store.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STORE = Path(os.environ.get("ENVMGR_TEST_STORE", "/var/tmp/envmgr-test-store"))
SPEC = 'name = "bench-slurm"\nbackend = "poetry"\nentry = ["python", "main.py"]\ngpu = "none"\n'
PYPROJECT = """[project]
name = "bench-slurm"
version = "0.1.0"
requires-python = ">=3.11,<3.12"
dependencies = ["envmgr-alpha>=1.0"]

[tool.poetry]
package-mode = false
"""
MAIN = 'import time\nprint("container started at", repr(time.time()), flush=True)\nimport envmgr_alpha\n'
STARTED = re.compile(r"container started at ([0-9.]+)")
ROUNDS = 5


def _started_at(log: Path) -> float:
    match = STARTED.search(log.read_text())
    if not match:
        raise RuntimeError(f"no start line in {log}")
    return float(match.group(1))


def _run(env: dict[str, str], *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "envmgr", "--json", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"envmgr {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")][-1]


def main() -> int:
    from tests.support.engine import ensure_engine
    from tests.support.pypi import Index, build_wheel
    from tests.support.slurm import LoopbackCluster

    ensure_engine()
    root = Path(tempfile.mkdtemp(prefix="envmgr-slurm-bench-"))
    wheels = root / "wheels"
    wheels.mkdir()
    build_wheel(wheels, "envmgr-alpha", "1.0", body='GREETING = "alpha"\n')
    index = Index(wheels).start()
    cluster = LoopbackCluster(root / "cluster")
    try:
        method = root / "base" / "methods" / "bench-slurm"
        method.mkdir(parents=True)
        (method / "envmgr.toml").write_text(SPEC)
        (method / "pyproject.toml").write_text(PYPROJECT)
        (method / "main.py").write_text(MAIN)
        env = {k: v for k, v in os.environ.items() if not k.startswith("ENVMGR_")}
        env.update(ENVMGR_BASE_DIR=str(root / "base"), ENVMGR_CACHE_DIR=str(root / "cache"),
                   ENVMGR_STORE_DIR=str(STORE), ENVMGR_CONFIG="/dev/null", ENVMGR_MIRRORS_PYPI=index.url)
        _run(env, "lock", "bench-slurm")
        _run(env, "build", "bench-slurm")
        cluster.start()
        env.update(cluster.env)
        _run(env, "run", "bench-slurm", "--on", "slurm", "--wait")   # warm-up: writes the export archive once
        local, slurm = [], []
        for _ in range(ROUNDS):
            started = time.time()
            done = _run(env, "run", "bench-slurm")
            local.append(_started_at(Path(done["run_dir"]) / "log.txt") - started)
            started = time.time()
            done = _run(env, "run", "bench-slurm", "--on", "slurm", "--wait")
            slurm.append(_started_at(Path(done["run_dir"]) / "log.txt") - started)
        extra = statistics.median(slurm) - statistics.median(local)
        results = {"local_to_container_start_s": [round(x, 3) for x in local],
                   "slurm_to_container_start_s": [round(x, 3) for x in slurm],
                   "local_median_s": round(statistics.median(local), 3),
                   "slurm_median_s": round(statistics.median(slurm), 3),
                   "slurm_extra_s_median": round(extra, 3), "goal_extra_s": 2.0, "met": extra < 2.0}
    finally:
        cluster.stop()
        index.stop()
        import docker

        client = docker.from_env()
        for image in client.images.list("envmgr/bench-slurm"):
            client.images.remove(image.id, force=True)
        shutil.rmtree(root, ignore_errors=True)
    (REPO / "bench-results").mkdir(exist_ok=True)
    (REPO / "bench-results" / "slurm.json").write_text(json.dumps(results, indent=1))
    for key, value in results.items():
        print(f"{key:>28}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
