"""Seconds per training step: this trainer (cached latents + embeddings) vs an uncached loop.

    python bench/bench_trainer.py                       # CPU, tiny model, 64 px, fp32
    python bench/bench_trainer.py --device cuda --resolution 512 --dtype bf16
    python bench/bench_trainer.py --model /path/to/sd3 --json

Both modes run the same optimizer step (`sd_trainer.loop.Trainer.train_step`) on the same
model and images; the uncached mode re-runs the VAE and the three text encoders for every
batch, as a straightforward loop would. Each mode runs in its own process so its peak RSS
(and peak GPU memory) is its own. Needs torch, diffusers, transformers, peft, accelerate.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHOD_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(METHOD_DIR))
GOAL_RATIO = 0.8


def sample_images(count: int, folder: Path) -> Path:
    """Coloured shapes with captions in the trainer's textfile layout."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        image = Image.new("RGB", (128, 128), (40 * index % 255, 120, 200))
        ImageDraw.Draw(image).ellipse((30, 30, 98, 98), fill=(230, 40 + 30 * index % 200, 40))
        image.save(folder / f"{index}.png")
        (folder / f"{index}.txt").write_text(f"a red circle number {index} on a blue background")
    return folder


class EncodedBatch:
    """What the uncached loop trains on: one batch, encoded right now, held in memory."""

    def __init__(self, latents, embeds, pooled):
        import torch

        self._latents, self._embeds, self._pooled = latents, embeds, pooled
        self.caption_ids = torch.arange(1, len(latents) + 1)
        self.order = torch.arange(len(latents))

    def latents(self, indices, flip=None):
        return self._latents[indices]

    def prompt_embeddings(self, prompt_ids):
        return self._embeds[prompt_ids], self._pooled[prompt_ids]


def run_mode(args) -> dict:
    import torch
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler

    from sd_trainer import buckets, data, model
    from sd_trainer.config import LORA_TARGETS, ImageBackend, TrainConfig
    from sd_trainer.loop import Trainer

    precision = "bf16" if args.dtype == "bf16" else "no"
    accelerator = Accelerator(mixed_precision=precision, cpu=args.device == "cpu" and torch.cuda.is_available())
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    device = accelerator.device
    scratch = Path(tempfile.mkdtemp(prefix="bench-trainer-"))
    backend = ImageBackend(id="bench", instance_data_dir=sample_images(args.images, scratch / "images"),
                           resolution_type="pixel_area", cache_dir_vae=scratch / "cache" / "vae")
    config = TrainConfig(pretrained_model_name_or_path=Path(args.model), output_dir=scratch / "output",
                         resolution=args.resolution, train_batch_size=args.batch_size, max_train_steps=args.steps,
                         learning_rate=1e-4, lora_rank=16, tokenizer_max_length=args.max_length, seed=0,
                         image_backends=[backend], text_cache_dir=scratch / "cache" / "text")

    if args.mode == "cached":  # what the trainer does: encode once to disk, drop the encoders, read per batch
        training_set = data.build_training_set(config, accelerator, dtype, lambda: False)
        sample_buckets = training_set.buckets
    else:  # a straightforward loop keeps the encoders and re-encodes every batch
        samples = data.assign_buckets(config, data.discover(config, {}), {})
        vae = model.load_vae(config.pretrained_model_name_or_path, dtype, device)
        text = model.load_text_pipeline(config.pretrained_model_name_or_path, dtype, device)
        sample_buckets = [s.bucket for s in samples]

        def encode(indices: list[int]) -> EncodedBatch:
            pixels = torch.stack([buckets.load_pixels(samples[i].path, samples[i].bucket, backend)[0] for i in indices])
            embeds, pooled = model.encode_prompts(text, [""] + [samples[i].caption for i in indices],
                                                  config.tokenizer_max_length, device)
            return EncodedBatch(model.encode_images(vae, pixels), embeds, pooled)

        training_set = encode([0])

    transformer = model.load_transformer(config.pretrained_model_name_or_path, dtype)
    torch.manual_seed(0)
    parameters = model.add_lora(transformer, config.lora_rank, None, 0.0, LORA_TARGETS["attention"])
    transformer.to(device)
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate)
    scheduler = get_scheduler("constant", optimizer)
    transformer, optimizer = accelerator.prepare(transformer, optimizer)
    plan = data.BatchPlan(torch.arange(len(sample_buckets)), config.train_batch_size, 1, 1, config.seed, sample_buckets)
    trainer = Trainer(config, accelerator, transformer, parameters, optimizer, scheduler, training_set, plan, dtype, 3.0)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    timings = []
    for step in range(1, args.warmup + args.steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        if args.mode == "uncached":
            batch = plan.indices(step, 0, 0).tolist()
            trainer.training_set = encode(batch)
            trainer.plan = data.BatchPlan(torch.arange(len(batch)), len(batch), 1, 1, config.seed,
                                          [sample_buckets[i] for i in batch])
            trainer.train_step(1)
        else:
            trainer.train_step(step)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step > args.warmup:
            timings.append(time.perf_counter() - started)
    return {
        "mode": args.mode,
        "device": str(device) + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else ""),
        "dtype": args.dtype,
        "resolution": args.resolution,
        "batch_size": args.batch_size,
        "steps_timed": len(timings),
        "s_per_step": statistics.median(timings),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="SD3 diffusers folder (default: a tiny random one built in a temp dir)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=154, help="T5 tokens per prompt")
    parser.add_argument("--json", action="store_true", help="print only the JSON result")
    parser.add_argument("--mode", choices=("cached", "uncached"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    if args.mode:  # child: one mode, JSON on the last stdout line
        print(json.dumps(run_mode(args)), flush=True)
        return 0

    if args.dtype == "bf16" and args.device == "cpu":
        parser.error("--dtype bf16 needs --device cuda")
    with tempfile.TemporaryDirectory(prefix="bench-sd3-") as scratch:
        if not args.model:
            sys.path.insert(0, str(METHOD_DIR / "tools"))
            import make_tiny_model

            args.model = str(Path(scratch) / "tiny-sd3")
            make_tiny_model.build_pipeline(seed=0).save_pretrained(args.model)
        results = {}
        child_args = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--json"]
        if "--model" not in " ".join(child_args):
            child_args += ["--model", args.model]
        for mode in ("cached", "uncached"):
            completed = subprocess.run([sys.executable, __file__, *child_args, "--mode", mode],
                                       capture_output=True, text=True)
            if completed.returncode != 0:
                print(completed.stderr[-3000:], file=sys.stderr)
                return 1
            results[mode] = json.loads(completed.stdout.strip().splitlines()[-1])

    ratio = results["cached"]["s_per_step"] / results["uncached"]["s_per_step"]
    summary = {"cached": results["cached"], "uncached": results["uncached"], "ratio": round(ratio, 3),
               "goal_ratio": GOAL_RATIO, "meets_goal": ratio <= GOAL_RATIO}
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    print(f"device {results['cached']['device']}, {args.dtype}, {args.resolution} px, batch {args.batch_size}, "
          f"median of {args.steps} steps")
    print(f"{'mode':10} {'s/step':>10} {'peak RSS MB':>12} {'peak GPU MB':>12}")
    for mode, result in results.items():
        gpu = f"{result['peak_gpu_mb']:.1f}" if result["peak_gpu_mb"] is not None else "-"
        print(f"{mode:10} {result['s_per_step']:10.4f} {result['peak_rss_mb']:12.1f} {gpu:>12}")
    print(f"cached / uncached = {ratio:.3f} (goal <= {GOAL_RATIO}: {'met' if ratio <= GOAL_RATIO else 'NOT met'})")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
