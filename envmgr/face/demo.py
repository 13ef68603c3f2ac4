"""`make demo`: the main job on embedded defaults, on a fresh machine with nothing but the repo.

Engine up (the Makefile's job), base image, sd-demo image, the project's tiny SD3 model and a
sample dataset in the platform's format placed in a demo base dir, a short CPU run, a summary.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from envmgr.build.build import build
from envmgr.core import paths
from envmgr.core.config import load_config
from envmgr.core.errors import EnvmgrError
from envmgr.core.spec import find_method
from envmgr.core.ui import Reporter
from envmgr.door.containers import BindMount, ContainerSpec
from envmgr.door.context import Context
from envmgr.runs.plan import RunRequest, prepare_base_dir
from envmgr.runs.run import run

MODEL = "tiny-sd3"
DATASET = "sample-dataset.zip"
STEPS = ["--max_steps=30", "--resolution=64", "--batch_size=2", "--learning_rate=1e-3",
         "--checkpointing_steps=10", "--validation_steps=15", "--validation_num_inference_steps=4"]


def _tool(ctx: Context, image: str, script: str, out_dir: Path, args: list[str]) -> None:
    spec = ContainerSpec(image=image, command=["python", f"{paths.CONTAINER_METHOD_DIR}/tools/{script}", *args],
                         mounts=[BindMount(out_dir, "/envmgr/out", read_only=False)],
                         env={"HOME": "/tmp", "HF_HUB_OFFLINE": "1"}, user=f"{os.getuid()}:{os.getgid()}")
    code = ctx.engine.run(spec, on_line=ctx.ui.log).exit_code
    if code != 0:
        raise EnvmgrError(f"demo: {script} failed (exit {code}); re-run with ENVMGR_VERBOSE=1 to see its output")
    _readable_by_all(out_dir)


def _readable_by_all(root: Path) -> None:
    """What the tools made (safetensors are written 0600) must be readable by the user a method runs as."""
    for item in [root, *root.rglob("*")]:
        if not item.is_symlink():
            item.chmod(item.stat().st_mode | (0o555 if item.is_dir() else 0o444))


def main() -> int:
    ui = Reporter(verbose=bool(os.environ.get("ENVMGR_VERBOSE")))
    try:
        config = load_config()
        ui.add_secrets(config.secrets())
        ctx = Context(config=config, ui=ui)
        base_dir = config.base_dir
        prepare_base_dir(base_dir)
        ui.step(f"demo base dir: {base_dir}")
        spec = find_method("sd-demo", base_dir)
        image = build(ctx, spec)
        ui.success(f"sd-demo image {image.tag} ({'already built' if image.reused else 'built'})")
        if not (base_dir / "models" / MODEL / "model_index.json").is_file():
            ui.step(f"building the tiny random-weight SD3 model into models/{MODEL} (no download)")
            _tool(ctx, image.image_id, "make_tiny_model.py", base_dir / "models", [f"/envmgr/out/{MODEL}"])
        if not (base_dir / "datasets" / DATASET).is_file():
            ui.step(f"writing a sample dataset in the platform's format: datasets/{DATASET}")
            _tool(ctx, image.image_id, "make_sample_dataset.py", base_dir / "datasets", [f"/envmgr/out/{DATASET}"])
        ui.step("training a LoRA on the CPU: envmgr run sd-demo --model tiny-sd3 --dataset "
                f"{DATASET} --gpus none -- {' '.join(STEPS)}")
        record = run(ctx, RunRequest(method=spec, model=MODEL, dataset=DATASET, gpus="none", args=STEPS))
    except EnvmgrError as exc:
        ui.error(exc.message, exc.hint)
        return int(exc.exit_code)
    run_dir = base_dir / "runs" / "sd-demo" / record["run_id"]
    ui.success(f"demo run {record['run_id']} {record['status']}")
    for kind, items in record.get("artifacts", {}).items():
        for item in items[:3]:
            ui.info(f"{kind:>17}: {run_dir / item}")
    ui.info(f"{'run record':>17}: {run_dir / 'run.json'}")
    ui.info(f"{'log':>17}: {run_dir / 'log.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
