"""Benchmarks for the engine as the source of truth for layers and SBOMs from records (issue 26). Prints a
table, writes bench-results/layer_facts.json.

Figures, each measured in one run on this machine, with sd-demo's real lock:
  - one pin changed in a second base dir: sd-demo built with its own cache first, then a copy of sd-demo
    whose lock differs in one small distribution (layers_bench.change_one_pin) built in another base dir
    with a new, empty cache: what it installed, and seconds (goal <= 10 s; was 63.4 s);
  - `envmgr sbom sd-demo` with an empty cache: seconds, and whether it read layers back (goal <= 10 s;
    was 72.8 s).
Run: `.venv/bin/python -m tests.bench.layer_facts_bench` (part of `make bench`). The first build of sd-demo
installs it when the engine lacks its image (3.5 GB of wheels, minutes); that is not a figure here.
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

from tests.bench.layers_bench import bumped_copy, change_one_pin

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "bench-results"


def run(*args: str, env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess]:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "envmgr", *args], env=env, cwd=REPO, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise SystemExit(f"envmgr {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return time.monotonic() - started, proc


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="envmgr-layer-facts-bench-", dir="/var/tmp"))
    cache = Path(os.environ.get("ENVMGR_BENCH_CACHE", "/var/tmp/envmgr-bench-cache"))
    base = {**os.environ, "ENVMGR_CONFIG": "/dev/null"}
    first_env = {**base, "ENVMGR_CACHE_DIR": str(cache), "ENVMGR_BASE_DIR": str(work / "first")}
    second_env = {**base, "ENVMGR_CACHE_DIR": str(work / "second-cache"), "ENVMGR_BASE_DIR": str(work / "second")}
    results: dict[str, float | str | list[str]] = {}
    name = f"sdpin-{os.getpid()}"
    try:
        wall, _ = run("build", "sd-demo", env=first_env)   # sd-demo in the engine, built with its own cache
        results.update(sd_demo_build_s=round(wall, 1))

        changed = change_one_pin(bumped_copy(work / "second", name), set())
        wall, proc = run("--json", "build", name, env=second_env)
        steps = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        installed = sorted({n for e in steps if e.get("event") == "step" for n in e.get("installed", [])})
        learned = sorted({n for e in steps if e.get("event") == "step" for n in e.get("learned", [])})
        tasks = {e["task"][:48]: e["seconds"] for e in steps if e.get("event") == "progress-end"}
        results.update(second_base_dir_pin=changed, second_base_dir_build_s=round(wall, 2),
                       second_base_dir_installed=installed, second_base_dir_learned=len(learned),
                       second_base_dir_tasks=json.dumps(tasks))

        rounds = []
        for index in range(3):
            sbom_env = {**first_env, "ENVMGR_CACHE_DIR": str(work / f"sbom-cache-{index}")}
            wall, proc = run("sbom", "sd-demo", env=sbom_env)
            rounds.append(wall)
            read_back = "back from the engine" in proc.stderr
        results.update(cold_sbom_s=round(min(rounds), 2), cold_sbom_read_layers=str(read_back),
                       cold_sbom_components=len(json.loads(proc.stdout)["components"]))
    finally:
        from envmgr.door.engine import Engine

        engine = Engine(os.environ.get("DOCKER_HOST"))
        for image in engine.images(label="org.envmgr.method"):   # every image the bench's method got
            for tag in [t for t in image.get("RepoTags") or [] if t.startswith(f"envmgr/{name}:")]:
                engine.remove_image(tag)
        shutil.rmtree(work, ignore_errors=True)
    OUT.mkdir(exist_ok=True)
    (OUT / "layer_facts.json").write_text(json.dumps(results, indent=1))
    for key, value in results.items():
        print(f"{key:>28}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
