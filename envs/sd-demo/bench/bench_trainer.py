"""Time per step, phase by phase: this trainer against a plain diffusers-style loop, side by side.

    python bench/bench_trainer.py                       # CPU, tiny model, 64 px, batch 2, fp32
    python bench/bench_trainer.py --device cuda --resolution 512 --dtype bf16
    python bench/bench_trainer.py --model /path/to/sd3 --rounds 3 --steps 200 --json

sd-demo: the trainer's own `train()` (encode cache, read-ahead, logging: everything a run does)
with a `StepProfile` that times each step's phases: data (waiting for the micro-batch), forward,
backward, optimizer (clip, AdamW, schedule), logging (progress event + metrics record).

plain: a straightforward loop as diffusers' SD3 LoRA example writes it, written here: the images
are decoded and resized once into pixel tensors, the captions encoded once, and on every step the
VAE encodes the batch (`data`), then the same transformer + LoRA (peft, same targets and rank),
flow-matching loss, accelerate backward, clip, AdamW, a tqdm bar and accelerator.log.
plain+text: the same, but the three text encoders also encode the batch's captions on every step,
as diffusers' example does when every image has a caption of its own.
sd-demo-sync (only with --modes): the trainer with dataloader_prefetch_qlen=0 and
cache_ram_budget_mb=0, i.e. each batch's files read and its noise drawn on its step, as before.
sd-demo-no-read-ahead (only with --modes): dataloader_prefetch_qlen=0 alone: the batches are made
from the in-memory cache on the step's own thread.
sd-demo@REV (with --against REV): the trainer as commit REV has it (`git archive`; or REV is a
folder holding another copy of envs/sd-demo), interleaved with today's, to measure a change
against its parent on the same machine at the same time.

Both use the same model folder, the same platform-format images (tools/make_sample_dataset.py,
unpacked by the entry script's preparation) and the same settings. Each run is its own process;
the modes alternate, `--rounds` times, and each mode's figure is the minimum over rounds of its
median step (the machine may be shared: `uptime` is printed before and after).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHOD_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(METHOD_DIR))
sys.path.insert(0, str(METHOD_DIR / "tools"))
GOAL_RATIO = 0.5  # sd-demo's step at most half the plain loop's
MODES = ("sd-demo", "plain", "plain+text", "sd-demo-sync", "sd-demo-no-read-ahead")
DEFAULT_MODES = "sd-demo,plain,plain+text"


def make_images(scratch: Path, count: int, size: int) -> Path:
    """The platform's upload format (JSONL captions, a few .txt, macOS junk), unpacked as sd-demo.py does."""
    import make_sample_dataset

    from sd_trainer.dataset_prep import prepare_dataset

    archive = make_sample_dataset.write_dataset(scratch / "upload.zip", "zip", count=count, size=size)
    prepare_dataset(archive, scratch / "images", scratch / "unpack")
    return scratch / "images"


def trainer_config(args, scratch: Path, **extra):
    from sd_trainer.config import ImageBackend, TrainConfig

    backend = ImageBackend(id="bench", instance_data_dir=Path(args.images_dir), cache_dir_vae=scratch / "cache" / "vae")
    return TrainConfig(**extra,pretrained_model_name_or_path=Path(args.model), output_dir=scratch / "output",
                       resolution=args.resolution, train_batch_size=args.batch_size,
                       max_train_steps=args.warmup + args.steps, learning_rate=1e-4, lora_rank=16, seed=0,
                       mixed_precision="bf16" if args.dtype == "bf16" else "no", tokenizer_max_length=args.max_length,
                       image_backends=[backend], text_cache_dir=scratch / "cache" / "text", disable_validation=True)


def step_profile():
    """This tree's sd_trainer/profile.py as a module of its own: the same timers for a trainer of another revision."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_step_profile", METHOD_DIR / "sd_trainer" / "profile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def synchronizer(device: str):
    import torch

    return torch.cuda.synchronize if device == "cuda" else None


def run_sd_demo(args, scratch: Path, mode: str) -> dict:
    from sd_trainer.loop import StopFlag, train
    StepProfile = step_profile().StepProfile

    profile = StepProfile(synchronizer(args.device), skip=args.warmup)
    extra = {"sd-demo-sync": dict(dataloader_prefetch_qlen=0, cache_ram_budget_mb=0),
             "sd-demo-no-read-ahead": dict(dataloader_prefetch_qlen=0)}.get(mode, {})
    events = io.StringIO()  # what the platform reads from a pipe; kept in memory here
    with contextlib.redirect_stdout(events):
        code = train(trainer_config(args, scratch, **extra), StopFlag(), profile)
    if code != 0:
        raise RuntimeError(f"train() returned {code}")
    return profile.summary()


class PlainLoop:
    """The reference loop (see the module docstring). Nothing from sd_trainer but the config values."""

    def __init__(self, args, config, text_every_step: bool):
        import numpy as np
        import torch
        from accelerate import Accelerator
        from diffusers import (
            AutoencoderKL,
            FlowMatchEulerDiscreteScheduler,
            SD3Transformer2DModel,
            StableDiffusion3Pipeline,
        )
        from diffusers.optimization import get_scheduler
        from peft import LoraConfig
        from PIL import Image

        self.accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=args.device == "cpu")
        device, dtype = self.accelerator.device, torch.bfloat16 if args.dtype == "bf16" else torch.float32
        model = config.pretrained_model_name_or_path
        self.vae = AutoencoderKL.from_pretrained(model, subfolder="vae", dtype=dtype).to(device).requires_grad_(False)
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(model, subfolder="scheduler")
        # the images: decoded, resized, centre-cropped and normalised once (diffusers' DreamBoothDataset)
        images = sorted(p for p in Path(args.images_dir).iterdir() if p.suffix.lower() in (".jpg", ".png"))
        size = config.resolution
        pixels, captions = [], []
        for path in images:
            image = Image.open(path).convert("RGB")
            scale = size / min(image.size)
            image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))),
                                 Image.Resampling.BILINEAR)
            left, top = (image.width - size) // 2, (image.height - size) // 2
            image = image.crop((left, top, left + size, top + size))
            array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
            pixels.append(torch.from_numpy(array).permute(2, 0, 1).contiguous())
            captions.append(path.with_suffix(".txt").read_text().strip())
        self.text = StableDiffusion3Pipeline.from_pretrained(model, transformer=None, vae=None, dtype=dtype).to(device)
        self.captions, self.max_length, self.text_every_step = captions, config.tokenizer_max_length, text_every_step
        self.device, self.dtype = device, dtype
        embeds, pooled = self.encode_text(list(range(len(captions))))  # one prompt per image, encoded once
        if not text_every_step:
            del self.text
        self.embeds, self.pooled = embeds.cpu(), pooled.cpu()
        self.dataset = list(zip(pixels, range(len(pixels)), strict=True))
        self.transformer = SD3Transformer2DModel.from_pretrained(model, subfolder="transformer", dtype=dtype)
        self.transformer.requires_grad_(False)
        self.transformer.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=config.lora_rank,
                                                init_lora_weights="gaussian",
                                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
        self.transformer.to(device)
        parameters = [p for p in self.transformer.parameters() if p.requires_grad]
        for parameter in parameters:
            parameter.data = parameter.data.float()
        self.parameters = parameters
        optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, betas=(0.9, 0.999), weight_decay=1e-4,
                                      eps=1e-8)
        lr_scheduler = get_scheduler("constant", optimizer)
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=config.train_batch_size, shuffle=True,
                                             drop_last=True, generator=torch.Generator().manual_seed(0))
        self.transformer, self.optimizer, self.loader, self.lr_scheduler = self.accelerator.prepare(
            self.transformer, optimizer, loader, lr_scheduler)

    def encode_text(self, indices: list[int]):
        import torch

        with torch.no_grad():
            embeds, _, pooled, _ = self.text.encode_prompt(
                prompt=[self.captions[i] for i in indices], prompt_2=None, prompt_3=None, device=self.device,
                do_classifier_free_guidance=False, max_sequence_length=self.max_length)
        return embeds, pooled

    def batches(self):
        while True:
            yield from self.loader

    def train(self, steps: int, profile) -> None:
        import torch
        import torch.nn.functional as F
        from tqdm.auto import tqdm

        accelerator, vae, transformer = self.accelerator, self.vae, self.transformer
        shift, scale = vae.config.shift_factor or 0.0, vae.config.scaling_factor
        timesteps_all, sigmas_all = self.scheduler.timesteps, self.scheduler.sigmas
        bar = tqdm(range(steps), desc="steps", file=sys.stderr, disable=not accelerator.is_local_main_process)
        transformer.train()
        batches = self.batches()
        for step in range(steps):
            profile.begin_step()
            with accelerator.accumulate(transformer):
                with profile.phase("data"):  # the batch, and the VAE (and the text encoders) on it
                    pixels, indices = next(batches)
                    if self.text_every_step:
                        prompt_embeds, pooled_embeds = self.encode_text(indices.tolist())
                    else:
                        prompt_embeds, pooled_embeds = self.embeds[indices], self.pooled[indices]
                    with torch.no_grad():
                        latents = vae.encode(pixels.to(self.device, self.dtype)).latent_dist.sample()
                    latents = ((latents - shift) * scale).to(self.dtype)
                    noise = torch.randn_like(latents)
                    u = torch.sigmoid(torch.randn(len(latents)))  # logit-normal timestep density
                    indices = (u * len(timesteps_all)).long().clamp(max=len(timesteps_all) - 1)
                    timesteps = timesteps_all[indices].to(self.device)
                    sigmas = sigmas_all[indices].to(self.device, self.dtype).view(-1, 1, 1, 1)
                    noisy = (1.0 - sigmas) * latents + sigmas * noise
                with profile.phase("forward"):
                    prediction = transformer(hidden_states=noisy, timestep=timesteps,
                                             encoder_hidden_states=prompt_embeds.to(self.device, self.dtype),
                                             pooled_projections=pooled_embeds.to(self.device, self.dtype),
                                             return_dict=False)[0]
                    loss = F.mse_loss(prediction.float(), (noise - latents).float())
                with profile.phase("backward"):
                    accelerator.backward(loss)
                with profile.phase("optimizer"):
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(self.parameters, 1.0)
                    self.optimizer.step()
                    self.lr_scheduler.step()
                    self.optimizer.zero_grad()
            with profile.phase("logging"):
                bar.update(1)
                logs = {"loss": loss.detach().item(), "lr": self.lr_scheduler.get_last_lr()[0]}
                bar.set_postfix(**logs)
                accelerator.log(logs, step=step)
            profile.end_step()
        bar.close()


def run_plain(args, scratch: Path, text_every_step: bool) -> dict:
    import torch

    StepProfile = step_profile().StepProfile

    loop = PlainLoop(args, trainer_config(args, scratch), text_every_step)
    torch.manual_seed(0)
    profile = StepProfile(synchronizer(args.device), skip=args.warmup)
    loop.train(args.warmup + args.steps, profile)
    return profile.summary()


def trainer_at(revision: str, scratch: Path) -> Path:
    """envs/sd-demo as `revision` has it, extracted under `scratch` (`revision` may be such a folder)."""
    if Path(revision).is_dir():
        return Path(revision).resolve()
    archive = subprocess.run(["git", "-C", str(METHOD_DIR), "archive", revision, "--", "."], capture_output=True,
                             check=True).stdout
    folder = scratch / "trainer-against"
    folder.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def child(args) -> int:
    if args.trainer_dir:  # sd-demo@REV: that trainer's sd_trainer, not this one
        sys.path.insert(0, args.trainer_dir)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    scratch = Path(tempfile.mkdtemp(prefix=f"bench-{args.mode}-", dir=args.scratch))
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    if args.mode.startswith("sd-demo"):
        summary = run_sd_demo(args, scratch, args.mode)
    else:
        summary = run_plain(args, scratch, text_every_step=args.mode == "plain+text")
    result = {
        "mode": args.mode, "profile": summary, "wall_s": round(time.perf_counter() - started, 2),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if args.device == "cuda" else None,
    }
    Path(args.result).write_text(json.dumps(result))
    return 0


def load() -> float:
    """The 1-minute load average (cores busy or waiting): how shared the machine was."""
    return round(os.getloadavg()[0], 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="SD3 diffusers folder (default: a tiny random one built in a temp dir)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--image-size", type=int, default=128, help="px of the generated square images")
    parser.add_argument("--steps", type=int, default=150, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3, help="runs per mode, alternating")
    parser.add_argument("--max-length", type=int, default=154, help="T5 tokens per prompt")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads in every run (default: torch's)")
    parser.add_argument("--modes", default=DEFAULT_MODES, help=f"comma-separated, from {', '.join(MODES)}")
    parser.add_argument("--against", metavar="REV", help="also time the trainer of git revision (or folder) REV (mode sd-demo@REV)")
    parser.add_argument("--json", action="store_true", help="print only the JSON result")
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--images-dir", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--trainer-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.mode:
        return child(args)
    if args.dtype == "bf16" and args.device == "cpu":
        parser.error("--dtype bf16 needs --device cuda")

    table = step_profile().table

    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    if "sd-demo" not in modes or not any(mode.startswith("plain") for mode in modes) or set(modes) - set(MODES):
        parser.error(f"--modes: sd-demo, at least one plain mode, from {', '.join(MODES)}")
    against = f"sd-demo@{Path(args.against).name if Path(args.against).is_dir() else args.against}" \
        if args.against else None
    if against:
        modes.insert(1, against)
    load_before = load()
    runs: dict[str, list[dict]] = {mode: [] for mode in modes}
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as scratch_name:
        scratch = Path(scratch_name)
        if not args.model:
            import make_tiny_model

            args.model = str(scratch / "tiny-sd3")
            make_tiny_model.build_pipeline(seed=0).save_pretrained(args.model)
        images = make_images(scratch, args.images, args.image_size)
        forwarded = ["--model", args.model, "--device", args.device, "--dtype", args.dtype, "--resolution",
                     str(args.resolution), "--batch-size", str(args.batch_size), "--steps", str(args.steps),
                     "--warmup", str(args.warmup), "--max-length", str(args.max_length), "--images-dir", str(images),
                     "--threads", str(args.threads), "--scratch", str(scratch)]
        old_trainer = ["--trainer-dir", str(trainer_at(args.against, scratch))] if against else []
        for round_number in range(args.rounds):
            for mode in modes if round_number % 2 == 0 else modes[::-1]:  # interleaved: load changes hit all
                result_file = scratch / f"{mode.replace('/', '_')}-{round_number}.json"
                which = ["--mode", "sd-demo", *old_trainer] if mode == against else ["--mode", mode]
                completed = subprocess.run([sys.executable, __file__, *forwarded, *which, "--result",
                                            str(result_file)], capture_output=True, text=True)
                if completed.returncode != 0:
                    print(completed.stderr[-3000:], file=sys.stderr)
                    return 1
                runs[mode].append(json.loads(result_file.read_text()))

    def step_ms(run: dict) -> float:
        return run["profile"]["step"]["median_ms"]

    best = {mode: min(runs[mode], key=step_ms) for mode in modes}
    ratios = {mode: round(step_ms(best["sd-demo"]) / step_ms(best[mode]), 3)
              for mode in modes if mode.startswith("plain")}

    def cpu_ms(run: dict) -> float:
        return run["profile"]["cpu"]["median_ms"]

    least_cpu = {mode: min(cpu_ms(run) for run in runs[mode]) for mode in modes}
    cpu_ratios = {mode: round(least_cpu["sd-demo"] / least_cpu[mode], 3) for mode in ratios}
    summary = {
        "device": best["sd-demo"]["device"], "dtype": args.dtype, "resolution": args.resolution,
        "batch_size": args.batch_size, "steps_timed": args.steps, "rounds": args.rounds,
        "torch_threads": best["sd-demo"]["torch_threads"], "load_average_before_after": [load_before, load()],
        "step_ms_per_round": {mode: [step_ms(run) for run in runs[mode]] for mode in modes},
        "cpu_ms_per_round": {mode: [cpu_ms(run) for run in runs[mode]] for mode in modes},
        "best": best, "ratios": ratios, "cpu_ratios": cpu_ratios, "goal_ratio": GOAL_RATIO,
        "meets_goal": {mode: ratio <= GOAL_RATIO for mode, ratio in ratios.items()},
    }
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    print(f"device {summary['device']}, {args.dtype}, {args.resolution} px, batch {args.batch_size}, "
          f"{args.steps} timed steps per run, {args.rounds} interleaved rounds, torch threads "
          f"{summary['torch_threads']}, 1-min load average {load_before} before, "
          f"{summary['load_average_before_after'][1]} after")
    print("median step per round (ms): " + "; ".join(
        f"{mode} " + ", ".join(f"{value:.2f}" for value in summary["step_ms_per_round"][mode]) for mode in modes))
    print("per mode, the round with the lowest median step:")
    print(table({mode: best[mode]["profile"] for mode in modes}))
    print(table({mode: best[mode]["profile"] for mode in modes}, "min_ms"))
    print("peak RSS MB: " + ", ".join(f"{mode} {best[mode]['peak_rss_mb']}" for mode in modes)
          + ("; peak GPU MB: " + ", ".join(f"{mode} {best[mode]['peak_gpu_mb']}" for mode in modes)
             if args.device == "cuda" else ""))
    for mode, ratio in ratios.items():
        print(f"sd-demo / {mode} = {ratio:.3f} (goal <= {GOAL_RATIO}: {'met' if ratio <= GOAL_RATIO else 'NOT met'}); "
              f"in process CPU time per step {cpu_ratios[mode]:.3f}")
    if against:
        print(f"sd-demo / {against} = {step_ms(best['sd-demo']) / step_ms(best[against]):.3f}; in process CPU time "
              f"per step {least_cpu['sd-demo'] / least_cpu[against]:.3f}")
    print(json.dumps({key: value for key, value in summary.items() if key != "best"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
