"""Peak RSS of a training run against dataset size: the lazy per-file cache vs the old in-memory cache.

    python bench/bench_cache.py                 # 200 and 2,000 images, distinct captions, tiny model, CPU
    python bench/bench_cache.py --sizes 500 --json

Each run is `train.py --config ...` in its own process (peak RSS from wait4). "before" is the
trainer as of BEFORE_REV (all latents and prompt embeddings held in every rank's RAM, one
`.pt` cache file), extracted with `git archive`; without git history it is reported as not
measured. Goal: with the lazy cache, peak RSS grows by less than GOAL_GROWTH_MB from the
smallest to the largest dataset.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHOD_DIR = Path(__file__).resolve().parents[1]
REPO_DIR = METHOD_DIR.parents[1]
BEFORE_REV = "2ec6ef0"  # the last commit with the in-memory cache
GOAL_GROWTH_MB = 40.0


def make_dataset(folder: Path, count: int) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        Image.new("RGB", (64, 64), (index % 251, (index * 7) % 253, (index * 13) % 255)).save(folder / f"{index}.png")
        (folder / f"{index}.txt").write_text(f"a picture of colour number {index}, variant {index * 31 % 997}")
    return folder


def write_config(folder: Path, model: Path, images: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    backends = [{"id": "images", "type": "local", "instance_data_dir": str(images), "caption_strategy": "textfile",
                 "resolution": 64, "cache_dir_vae": str(folder / "cache" / "vae")},
                {"id": "text", "dataset_type": "text_embeds", "default": True, "cache_dir": str(folder / "cache" / "text")}]
    (folder / "multidatabackend.json").write_text(json.dumps(backends))
    config = {"model_type": "lora", "model_family": "sd3", "pretrained_model_name_or_path": str(model),
              "output_dir": str(folder / "output"), "resolution": 64, "train_batch_size": 4, "max_train_steps": 10,
              "learning_rate": 1e-4, "lora_rank": 4, "seed": 1, "mixed_precision": "no", "tokenizer_max_length": 154,
              "checkpointing_steps": 0, "disable_validation": True, "vae_batch_size": 16,
              "data_backend_config": str(folder / "multidatabackend.json"), "report_to": "none"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder / "config.json"


def peak_rss_mb(method_dir: Path, config: Path) -> tuple[float, float]:
    """(peak RSS in MB, seconds) of one trainer process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("ENVMGR_GPUS", None)
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, str(method_dir / "train.py"), "--config", str(config)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _stderr = process.stderr.read()
    _pid, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{method_dir.name} trainer failed: {_stderr.decode(errors='replace')[-1500:]}")
    return usage.ru_maxrss / 1024, time.perf_counter() - started


def old_trainer(scratch: Path) -> Path | None:
    try:
        archive = subprocess.run(["git", "-C", str(REPO_DIR), "archive", BEFORE_REV, "envs/sd-demo"],
                                 capture_output=True, check=True).stdout
        scratch.mkdir(parents=True, exist_ok=True)
        subprocess.run(["tar", "-x", "-C", str(scratch)], input=archive, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return scratch / "envs" / "sd-demo"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 2000])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(METHOD_DIR / "tools"))
    import make_tiny_model

    results: dict = {"sizes": args.sizes, "after": {}, "before": {}}
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as scratch_name:
        scratch = Path(scratch_name)
        model = scratch / "tiny-sd3"
        make_tiny_model.build_pipeline(seed=0).save_pretrained(model)
        before_dir = old_trainer(scratch / "before-code")
        for size in args.sizes:
            images = make_dataset(scratch / f"images-{size}", size)
            results["after"][size] = peak_rss_mb(METHOD_DIR, write_config(scratch / f"after-{size}", model, images))
            if before_dir:
                results["before"][size] = peak_rss_mb(before_dir, write_config(scratch / f"before-{size}", model, images))
    growth = results["after"][args.sizes[-1]][0] - results["after"][args.sizes[0]][0]
    results["after_growth_mb"] = round(growth, 1)
    results["meets_goal"] = growth <= GOAL_GROWTH_MB
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    print(f"peak RSS of a 10-step CPU run (tiny SD3, 64 px, distinct captions); before = trainer at {BEFORE_REV}")
    print(f"{'images':>8} {'before MB':>10} {'after MB':>10} {'before s':>9} {'after s':>8}")
    for size in args.sizes:
        before = results["before"].get(size)
        after = results["after"][size]
        print(f"{size:8d} {before[0] if before else float('nan'):10.1f} {after[0]:10.1f} "
              f"{before[1] if before else float('nan'):9.1f} {after[1]:8.1f}")
    if not results["before"]:
        print(f"before: not measured (git history with {BEFORE_REV} not available)")
    print(f"after: peak RSS grows {growth:.1f} MB from {args.sizes[0]} to {args.sizes[-1]} images "
          f"(goal <= {GOAL_GROWTH_MB:.0f} MB: {'met' if results['meets_goal'] else 'NOT met'})")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
