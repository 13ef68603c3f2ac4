"""Benchmarks for the core (issue: envmgr core). Prints a table and writes bench-results/core.json.

Each figure is a ratio measured in one run on this machine:
  - no-op `envmgr build sd-demo` wall time (goal <= 1 s)
  - warm rebuild of the sd-demo environment layer vs `uv pip install` of the same pins into an
    empty venv with the same warm cache (goal <= 1.5x)
    (the engine still holds the image: nothing is sent to it), and the same rebuild when the engine
    lacks the image too (every environment layer is sent: warm_rebuild_and_load)
  - cold sd-demo build (empty caches, the engine lacking the image) vs downloading and unpacking its
    locked wheels (`uv pip install --no-cache` into an empty venv) (goal <= 1.3x)
  - the sd-demo image size
Run: `make bench` (or `.venv/bin/python -m tests.bench.core_bench [--skip-cold]`).
"""

from __future__ import annotations

import argparse
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


def envmgr(*args: str, env: dict[str, str]) -> float:
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "envmgr", *args], env=env, check=True, cwd=REPO,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.monotonic() - started


def requirements_file(ctx, directory: Path) -> Path:
    from envmgr.core.spec import find_method
    from envmgr.images.base import ensure_base
    from envmgr.lock.backends import get_backend

    spec = find_method("sd-demo", None)
    base = ensure_base(ctx, spec.base_image)
    path = directory / "requirements.txt"
    path.write_text(get_backend(spec).requirements(spec, base))
    return path


def uv_install(requirements: Path, cache: Path | None, venv: Path, *extra: str) -> float:
    from uv import find_uv_bin

    uv = find_uv_bin()
    env = {**os.environ, "UV_LINK_MODE": "copy", "UV_NO_CONFIG": "1"}
    subprocess.run([uv, "venv", "-q", "--python", sys.executable, str(venv)], check=True, env=env)
    started = time.monotonic()
    cache_args = ["--cache-dir", str(cache)] if cache else ["--no-cache"]
    subprocess.run([uv, "pip", "install", "-q", "--python", str(venv / "bin" / "python"), "--require-hashes",
                    "--no-deps", *cache_args, *extra, "-r", str(requirements)], check=True, env=env)
    return time.monotonic() - started


def empty_layer_store(cache: Path) -> None:
    for folder in ("layers", "index"):
        shutil.rmtree(cache / "store" / folder, ignore_errors=True)


def remove_method_images(ctx, method: str) -> None:
    """Every image of the method, whatever its tags (other caches on this machine tag the same image)."""
    for image in ctx.engine.images(label=f"org.envmgr.method={method}"):
        ctx.engine._api.remove_image(image["Id"], force=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-cold", action="store_true", help="skip the cold build (downloads GBs twice)")
    args = parser.parse_args()
    from envmgr.core.config import load_config
    from envmgr.core.ui import Reporter
    from envmgr.door.context import Context

    work = Path(tempfile.mkdtemp(prefix="envmgr-bench-", dir="/var/tmp"))
    cache = Path(os.environ.get("ENVMGR_BENCH_CACHE", "/var/tmp/envmgr-bench-cache"))
    env = {**os.environ, "ENVMGR_CACHE_DIR": str(cache), "ENVMGR_CONFIG": "/dev/null"}
    os.environ.update(ENVMGR_CACHE_DIR=str(cache))
    ctx = Context(load_config(files=[]), Reporter("plain"))
    results: dict[str, float | str] = {}
    try:
        envmgr("build", "sd-demo", env=env)  # make sure the image exists
        noop = min(envmgr("build", "sd-demo", env=env) for _ in range(3))
        results["noop_build_s"] = round(noop, 3)

        requirements = requirements_file(ctx, work)
        # a warm rebuild: the uv cache and the base image stay, the environment layers and their records go
        empty_layer_store(cache)
        warm = envmgr("build", "sd-demo", "--force", env=env)
        baseline = uv_install(requirements, cache / "uv", work / "venv-warm")
        results.update(warm_env_rebuild_s=round(warm, 1), warm_uv_install_s=round(baseline, 1),
                       warm_ratio=round(warm / baseline, 2))
        # context, not the goal's baseline: the same install writing bytecode too, as envmgr's layers hold it
        compiled = uv_install(requirements, cache / "uv", work / "venv-warm-compiled", "--compile-bytecode")
        results.update(warm_uv_install_compile_s=round(compiled, 1), warm_ratio_vs_compiled=round(warm / compiled, 2))
        # the same, but the engine lacks the image too: every environment layer is also sent into the engine
        remove_method_images(ctx, "sd-demo")
        empty_layer_store(cache)
        loaded = envmgr("build", "sd-demo", "--force", env=env)
        results.update(warm_rebuild_and_load_s=round(loaded, 1), warm_load_ratio=round(loaded / baseline, 2))

        if not args.skip_cold:
            cold_cache = work / "cold-cache"
            cold_env = {**env, "ENVMGR_CACHE_DIR": str(cold_cache), "ENVMGR_STORE_DIR": str(cache / "store")}
            remove_method_images(ctx, "sd-demo")   # cold: the engine lacks the environment layers too
            cold = envmgr("build", "sd-demo", "--force", env=cold_env)
            shutil.rmtree(cold_cache, ignore_errors=True)
            download = uv_install(requirements, None, work / "venv-cold")
            results.update(cold_build_s=round(cold, 1), download_unpack_s=round(download, 1),
                           cold_ratio=round(cold / download, 2))

        from envmgr.build.build import build
        from envmgr.core.spec import find_method

        image = ctx.engine.inspect_image(build(ctx, find_method("sd-demo", None)).image_id)
        results["image_size_gb"] = round(image["Size"] / 1e9, 2)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    OUT.mkdir(exist_ok=True)
    (OUT / "core.json").write_text(json.dumps(results, indent=1))
    for key, value in results.items():
        print(f"{key:>22}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
