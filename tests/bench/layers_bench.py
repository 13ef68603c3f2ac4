"""Benchmarks for per-distribution environment layers (issue 14). Prints a table, writes bench-results/layers.json.

Figures, each measured in one run on this machine, with sd-demo's real lock:
  - rebuild after one pure-Python pin change: a copy of sd-demo (`sdbump`, the same torch) whose lock
    differs from sd-demo's in one small distribution's requirement line (one file hash left out: the
    same code path as a patch release, a new unit key, without a mirror that serves a new version),
    built after sd-demo (goal <= 5 s; was 57 s);
  - warm full environment rebuild (layer store emptied, uv cache warm) vs `uv pip install` of the same
    pins into an empty venv with the same cache (goal <= 1.5x);
  - engine disk for sd-demo plus sdbump: what the second image adds (goal: 1 x torch + the difference).
Run: `.venv/bin/python -m tests.bench.layers_bench` (part of `make bench`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.bench.core_bench import envmgr, requirements_file, uv_install

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "bench-results"


CANDIDATES = ("tqdm", "filelock", "fsspec", "packaging", "requests", "regex")


def bumped_copy(base_dir: Path, name: str) -> Path:
    """sd-demo's files as an added method `name` (the same lock, so the same layers)."""
    folder = base_dir / "methods" / name
    shutil.copytree(REPO / "envs" / "sd-demo", folder, symlinks=True,
                    ignore=shutil.ignore_patterns("variants", ".venv*", "__pycache__", "env-layers.json"))
    spec = folder / "envmgr.toml"
    spec.write_text(re.sub(r'^name = "sd-demo"', f'name = "{name}"', spec.read_text(), count=1, flags=re.M))
    return folder / "poetry.lock"


def change_one_pin(lock: Path, done: set[str]) -> str:
    """Leave one small distribution's sdist hash out of the lock: a new requirement line, a new unit key."""
    text = lock.read_text()
    for candidate in CANDIDATES:
        if candidate in done:
            continue
        block = re.search(r'\[\[package\]\]\nname = "' + candidate + r'"\n(?:.*\n)*?files = \[\n((?:.*\n)*?)\]', text)
        if not block:
            continue
        sdist = [line for line in block.group(1).splitlines() if ".tar.gz" in line]
        if sdist and block.group(1).count("{file") > 1:
            lock.write_text(text.replace(sdist[0] + "\n", "", 1))
            done.add(candidate)
            return candidate
    raise SystemExit("no small distribution with an sdist hash left in sd-demo's lock")


def timed_build(name: str, env: dict[str, str]) -> tuple[float, dict[str, float]]:
    """Wall time of `envmgr build` and the seconds of each of its progress tasks."""
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "envmgr", "--json", "build", name], env=env, check=True,
                          cwd=REPO, capture_output=True, text=True)
    wall = time.monotonic() - started
    tasks: dict[str, float] = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            event = json.loads(line)
            if event.get("event") == "progress-end":
                tasks[event["task"][:40]] = event["seconds"]
    return wall, tasks


def main() -> int:
    from envmgr.core.config import load_config
    from envmgr.core.ui import Reporter
    from envmgr.door.context import Context

    work = Path(tempfile.mkdtemp(prefix="envmgr-layers-bench-", dir="/var/tmp"))
    cache = Path(os.environ.get("ENVMGR_BENCH_CACHE", "/var/tmp/envmgr-bench-cache"))
    base_dir = work / "base"
    env = {**os.environ, "ENVMGR_CACHE_DIR": str(cache), "ENVMGR_CONFIG": "/dev/null",
           "ENVMGR_BASE_DIR": str(base_dir)}
    os.environ.update(ENVMGR_CACHE_DIR=str(cache), ENVMGR_BASE_DIR=str(base_dir))
    ctx = Context(load_config(files=[]), Reporter("plain"))
    results: dict[str, float | str] = {}
    name = f"sdbump-{os.getpid()}"
    try:
        envmgr("build", "sd-demo", env=env)   # make sure sd-demo's layers are in the store and the engine
        if "--skip-warm" not in sys.argv:
            for folder in ("layers", "index"):
                shutil.rmtree(cache / "store" / folder, ignore_errors=True)
            warm = envmgr("build", "sd-demo", "--force", env=env)
            baseline = uv_install(requirements_file(ctx, work), cache / "uv", work / "venv-warm")
            results.update(warm_env_rebuild_s=round(warm, 1), warm_uv_install_s=round(baseline, 1),
                           warm_ratio=round(warm / baseline, 2))

        lock = bumped_copy(base_dir, name)
        done: set[str] = set()
        first = change_one_pin(lock, done)
        wall, _ = timed_build(name, env)        # a second method with sd-demo's torch, one bucket apart
        results.update(second_method_first_build_s=round(wall, 2), second_method_changed=first)
        changed = change_one_pin(lock, done)    # then one more pin change in that method: the figure
        wall, tasks = timed_build(name, env)
        results.update(pin_change=changed, pin_change_rebuild_s=round(wall, 2),
                       pin_change_tasks=json.dumps(tasks))

        usage = {i["Id"]: i for i in ctx.engine.image_disk_usage()}
        sd = usage[ctx.engine.image_id("envmgr/sd-demo:latest")]
        bump = usage[ctx.engine.image_id(f"envmgr/{name}:latest")]
        results.update(sd_demo_image_gb=round(sd["Size"] / 1e9, 2), second_image_gb=round(bump["Size"] / 1e9, 2),
                       second_image_shared_gb=round(bump["SharedSize"] / 1e9, 2),
                       second_image_unique_mb=round((bump["Size"] - bump["SharedSize"]) / 1e6, 1))
    finally:
        for image in ctx.engine.images(label="org.envmgr.method"):   # every image the bench's method got
            for tag in [t for t in image.get("RepoTags") or [] if t.startswith(f"envmgr/{name}:")]:
                ctx.engine.remove_image(tag)
        shutil.rmtree(work, ignore_errors=True)
    OUT.mkdir(exist_ok=True)
    (OUT / "layers.json").write_text(json.dumps(results, indent=1))
    for key, value in results.items():
        print(f"{key:>26}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
