"""Benchmark for `envmgr run --on slurm` (issue: beyond one server; issue 26). Prints figures and writes
bench-results/slurm.json.

  - submission overhead: from the start of `envmgr run` to the moment the method's container starts
    (the method prints time.time() as its first line), through the one-node loopback Slurm cluster,
    against the same for a local run of the same method (interleaved, median of ROUNDS); goal: under 2 s
    more than local
  - measured twice, side by side: with Slurm's default scheduler settings, and with the setting README's
    "Slurm" section proposes to sites (SchedulerParameters=batch_sched_delay=0): by default slurmctld starts a
    batch job on its once-a-second background pass, and at most once every 3 s (batch_sched_delay)
  - where a Slurm run's time goes (medians), from the cluster's own logs: submit (envmgr start to sbatch
    accepted), scheduler (to the job's allocation), launch (to the job step's task), node (the node-local
    `envmgr slurm-step` to its container's start)
Uses a one-package fixture method on a loopback PyPI index (no network) and the tests' base-image store.
envmgr's modules are compiled first (compileall), as an installed envmgr's are: a checkout run with
PYTHONDONTWRITEBYTECODE set compiles them again in every process (about 0.5 s), and a Slurm run starts two.
"""

from __future__ import annotations

import datetime as dt
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
GOAL_EXTRA_S = 2.0
# (name, SchedulerParameters): Slurm's defaults, and what README's Slurm section proposes to sites
SETTINGS = (("default", None), ("tuned", "batch_sched_delay=0"))
LOG_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\dT[\d:.]+)\] (.*)$")


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


def _log_times(log: Path, *patterns: str) -> list[float | None]:
    """The time (epoch seconds) of the first line of a Slurm daemon's log matching each pattern."""
    found: list[float | None] = [None] * len(patterns)
    for line in log.read_text(errors="replace").splitlines():
        match = LOG_LINE.match(line)
        if not match:
            continue
        for i, pattern in enumerate(patterns):
            if found[i] is None and re.search(pattern, match.group(2)):
                found[i] = dt.datetime.fromisoformat(match.group(1)).timestamp()   # the daemons' local time
    return found


def _phases(cluster, job_id: str, started: float, container: float) -> dict[str, float]:
    submitted, allocated = _log_times(cluster.root / "log" / "slurmctld.log",
                                      rf"submit_batch_job: JobId={job_id}\b", rf"Allocate JobId={job_id}\b")
    [task] = _log_times(cluster.root / "log" / "slurmd.log", rf"launch task StepId={job_id}\.0\b")
    if None in (submitted, allocated, task):
        return {}
    return {"submit": submitted - started, "scheduler": allocated - submitted, "launch": task - allocated,
            "node": container - task}


def _measure(env: dict[str, str], cluster) -> dict:
    """Interleaved local and Slurm runs on a started cluster: each one's time to its container's start."""
    env = {**env, **cluster.env}
    _run(env, "run", "bench-slurm", "--on", "slurm", "--wait")   # warm-up: writes the export archive once
    local, slurm, phases = [], [], []
    for _ in range(ROUNDS):
        started = time.time()
        done = _run(env, "run", "bench-slurm")
        local.append(_started_at(Path(done["run_dir"]) / "log.txt") - started)
        started = time.time()
        done = _run(env, "run", "bench-slurm", "--on", "slurm", "--wait")
        run_dir = Path(done["run_dir"])
        container = _started_at(run_dir / "log.txt")
        slurm.append(container - started)
        job_id = json.loads((run_dir / "run.json").read_text())["scheduler"]["job_id"]
        phases.append(_phases(cluster, str(job_id), started, container))
    extra = statistics.median(slurm) - statistics.median(local)
    known = [p for p in phases if p]
    return {"local_to_container_start_s": [round(x, 3) for x in local],
            "slurm_to_container_start_s": [round(x, 3) for x in slurm],
            "local_median_s": round(statistics.median(local), 3),
            "slurm_median_s": round(statistics.median(slurm), 3),
            "slurm_extra_s_median": round(extra, 3),
            "slurm_phases_median_s": {k: round(statistics.median(p[k] for p in known), 3)
                                      for k in ("submit", "scheduler", "launch", "node")} if known else {},
            "met": extra < GOAL_EXTRA_S}


def main() -> int:
    from tests.support.engine import ensure_engine
    from tests.support.pypi import Index, build_wheel
    from tests.support.slurm import LoopbackCluster

    ensure_engine()
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "envmgr")], check=True)
    root = Path(tempfile.mkdtemp(prefix="envmgr-slurm-bench-"))
    wheels = root / "wheels"
    wheels.mkdir()
    build_wheel(wheels, "envmgr-alpha", "1.0", body='GREETING = "alpha"\n')
    index = Index(wheels).start()
    results: dict = {"goal_extra_s": GOAL_EXTRA_S}
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
        for name, parameters in SETTINGS:
            cluster = LoopbackCluster(root / f"cluster-{name}", scheduler_parameters=parameters)
            try:
                cluster.start()
                results[name] = {"scheduler_parameters": parameters or "(Slurm's defaults)",
                                 **_measure(env, cluster)}
            finally:
                cluster.stop()
    finally:
        index.stop()
        import docker

        client = docker.from_env()
        for image in client.images.list("envmgr/bench-slurm"):
            client.images.remove(image.id, force=True)
        shutil.rmtree(root, ignore_errors=True)
    (REPO / "bench-results").mkdir(exist_ok=True)
    (REPO / "bench-results" / "slurm.json").write_text(json.dumps(results, indent=1))
    names = [name for name, _ in SETTINGS]
    print(f"{'to container start (s)':>28}  " + "  ".join(f"{n:>24}" for n in names))
    for key in ("scheduler_parameters", "local_median_s", "slurm_median_s", "slurm_extra_s_median", "met"):
        print(f"{key:>28}  " + "  ".join(f"{str(results[n][key]):>24}" for n in names))
    for phase in ("submit", "scheduler", "launch", "node"):
        print(f"{'slurm phase: ' + phase:>28}  "
              + "  ".join(f"{str(results[n]['slurm_phases_median_s'].get(phase)):>24}" for n in names))
    print(f"{'goal_extra_s':>28}  {GOAL_EXTRA_S}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
