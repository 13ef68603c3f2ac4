"""The install task of a cold environment, phase by phase (issue 26): uv install, GPU facts, split, bytecode.

Makes a method's per-distribution layers with an empty layer store in a new cache dir, as a first build
does, and prints the ENVMGR-PHASE marks of the install step (seconds since it started). The new cache
borrows what is not measured here: the uv cache (hard links from `--uv-cache-from`: no download, so the
figures are the install's own) and the base image record (`--base-from`, a cache's `store/base`, so the
base is not bootstrapped again). It stops before the layers are written (`--write` writes them, and prints
their diff IDs: compare them between two checkouts to see that a change kept every layer's bytes).
Nothing is learned from the engine's images (those would make the install skip distributions).

Run: `.venv/bin/python -m tests.bench.install_phases_bench --uv-cache-from <cache>/uv
      --base-from <cache>/store/base [--method sd-demo] [--rounds 2] [--write]`
(on a busy machine, compare checkouts interleaved and take each phase's minimum).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path


class _Staged(Exception):
    """Raised where the layers would be written (the install task is done)."""


def one_round(method: str, uv_from: Path, base_from: Path, write: bool) -> dict:
    from envmgr.build import layers
    from envmgr.build.target import env_layers, inputs
    from envmgr.core.config import load_config
    from envmgr.core.spec import find_method
    from envmgr.core.ui import Reporter
    from envmgr.door.context import Context
    from envmgr.images.base import ensure_base

    marks: list[tuple[str, float]] = []

    class Marks(Reporter):   # keeps the ENVMGR-PHASE marks stage_units logs, with their times
        def log(self, line: str) -> None:
            if line.startswith("ENVMGR-PHASE ") and " at " in line:
                name, _, at = line[len("ENVMGR-PHASE "):].rpartition(" at ")
                marks.append((name, float(at.split()[0])))

    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="envmgr-install-phases-") as cache:
        subprocess.run(["cp", "-al", str(uv_from), f"{cache}/uv"], check=True)
        (Path(cache) / "store").mkdir()
        shutil.copytree(base_from, Path(cache) / "store" / "base")
        ctx = Context(config=load_config({"cache_dir": cache}), ui=Marks("plain"))
        spec = find_method(method, None)
        base = ensure_base(ctx, spec.base_image)
        data = inputs(ctx, spec, base)
        real = layers._layers_for_plan
        if not write:
            def stop(*_args, **_kwargs):
                raise _Staged()
            layers._layers_for_plan = stop   # type: ignore[assignment]
        started = time.monotonic()
        diff_ids: list[str] = []
        try:
            diff_ids = [layer.diff_id for layer in env_layers(ctx, spec, base, data).layers]
        except _Staged:
            pass
        finally:
            layers._layers_for_plan = real   # type: ignore[assignment]
        return {"method": method, "seconds": round(time.monotonic() - started, 1), "marks": marks,
                "diff_ids": diff_ids}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", default="sd-demo")
    parser.add_argument("--uv-cache-from", type=Path, required=True)
    parser.add_argument("--base-from", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    for index in range(args.rounds):
        result = one_round(args.method, args.uv_cache_from, args.base_from, args.write)
        steps, last = [], 0.0
        for name, at in result["marks"]:
            steps.append(f"{name} +{at - last:.1f} s")
            last = at
        print(f"round {index + 1}: {result['seconds']} s to {'written layers' if args.write else 'staged trees'}: "
              + ", ".join(steps), flush=True)
        if args.write:
            print(json.dumps({"diff_ids": result["diff_ids"]}), flush=True)


if __name__ == "__main__":
    main()
