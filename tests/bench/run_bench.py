"""Benchmarks for `envmgr run` (issue: run sd-demo). Prints figures and writes bench-results/run.json.

  - envmgr run overhead: wall time of `envmgr run sd-demo ... --max_steps=1` minus the wall time of
    the same container started bare through the Engine API with the same mounts and command
    (goal < 0.5 s)
  - time from `envmgr run` to the first training step (first progress line)
Uses the demo base dir (tiny SD3 model + sample dataset; made like `make demo` does when missing).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ARGS = ["--max_steps=1", "--resolution=64", "--validation_steps=0", "--checkpointing_steps=0"]


def main() -> int:
    from envmgr.build.build import build
    from envmgr.core.config import load_config
    from envmgr.core.spec import find_method
    from envmgr.core.ui import Reporter
    from envmgr.door.containers import BindMount, ContainerSpec
    from envmgr.door.context import Context
    from envmgr.face.demo import DATASET, MODEL, _tool
    from envmgr.runs.plan import prepare_base_dir

    base_dir = Path(os.environ.get("ENVMGR_BASE_DIR", REPO / ".demo"))
    env = {**os.environ, "ENVMGR_BASE_DIR": str(base_dir)}
    ctx = Context(load_config({"base_dir": str(base_dir)}), Reporter("plain"))
    prepare_base_dir(base_dir)
    spec = find_method("sd-demo", base_dir)
    image = build(ctx, spec)
    if not (base_dir / "models" / MODEL / "model_index.json").is_file():
        _tool(ctx, image.image_id, "make_tiny_model.py", base_dir / "models", [f"/envmgr/out/{MODEL}"])
    if not (base_dir / "datasets" / DATASET).is_file():
        _tool(ctx, image.image_id, "make_sample_dataset.py", base_dir / "datasets", [f"/envmgr/out/{DATASET}"])

    timings = []
    first_steps = []
    for _ in range(3):
        started = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "envmgr", "--json", "run", "sd-demo", "--model", MODEL,
                                 "--dataset", DATASET, "--gpus", "none", "--", *ARGS], env=env, cwd=REPO,
                                stdout=subprocess.PIPE, text=True)
        first = None
        run_dir = None
        for line in proc.stdout:
            if first is None and '"method.progress"' in line:
                first = time.monotonic() - started
            if '"run_dir"' in line:
                run_dir = json.loads(line).get("run_dir")
        proc.wait()
        timings.append(time.monotonic() - started)
        first_steps.append(first)

        record = json.loads((Path(run_dir) / "run.json").read_text())
        bare_run = Path(run_dir).with_name(Path(run_dir).name + "-bare")
        (bare_run / "output").mkdir(parents=True)
        mounts = [BindMount(bare_run, "/envmgr/run", read_only=False),
                  BindMount(Path(record["model"]["path"]), f"/envmgr/models/{MODEL}", read_only=True),
                  BindMount(Path(record["dataset"]["path"]), f"/envmgr/data/{DATASET}", read_only=True)]
        bare = ContainerSpec(image=image.image_id, command=record["command"], mounts=mounts, workdir="/envmgr/run",
                             env={"HOME": "/tmp", "HF_HUB_OFFLINE": "1", "MPLCONFIGDIR": "/tmp/matplotlib",
                                  "ENVMGR_OUTPUT_DIR": "/envmgr/run/output"},
                             user=f"{os.getuid()}:{os.getgid()}", network="none")
        started = time.monotonic()
        ctx.engine.run(bare)
        timings[-1] = (timings[-1], time.monotonic() - started)
    overheads = [a - b for a, b in timings]
    results = {"envmgr_run_s": [round(a, 2) for a, _ in timings], "bare_container_s": [round(b, 2) for _, b in timings],
               "overhead_s_median": round(sorted(overheads)[1], 3),
               "time_to_first_step_s_median": round(sorted(first_steps)[1], 2)}
    (REPO / "bench-results").mkdir(exist_ok=True)
    (REPO / "bench-results" / "run.json").write_text(json.dumps(results, indent=1))
    for key, value in results.items():
        print(f"{key:>28}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
