"""Seconds per step and peak GPU memory of a LoRA step on an SD3.5-medium-shaped transformer.

    python bench/gpu_bench.py                    # CUDA, 1024 px, bf16, batch 1/2/4, with and without checkpointing
    python bench/gpu_bench.py --batches 1 2 --resolution 768 --steps 10 --json
    python bench/gpu_bench.py --tiny             # a few-thousand-weight model on the CPU (smoke test)

The transformer is built here with random weights from SD3.5-medium's published shape
(diffusers' SD3Transformer2DModel config: 24 layers, 24 heads of 64, dual attention in
layers 0-12, RMS qk-norm, joint dim 4096, pooled dim 2048): nothing is downloaded. The LoRA
is the trainer's own (`sd_trainer.model.add_lora`, attention targets, rank 16), the step
the trainer's objective (noise -> predict -> MSE -> AdamW). Each row also has the step's
breakdown (sd_trainer.profile.StepProfile: data = the batch's tensors made on the device,
forward, backward, optimizer; the GPU is synchronized around each phase), printed as a table.
Without CUDA (and no --tiny) it says so and exits 0 having measured nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

METHOD_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(METHOD_DIR))

SD35_MEDIUM = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)
TINY = dict(
    sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
    num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
    pos_embed_max_size=96, dual_attention_layers=(0,), qk_norm="rms_norm",
)
CLIP_TOKENS, T5_TOKENS = 77, 154


def build_transformer(shape: dict, device, dtype):
    import torch
    from diffusers import SD3Transformer2DModel

    with torch.device(device):  # initialised on the device: seconds, not minutes of CPU init
        torch.manual_seed(0)
        transformer = SD3Transformer2DModel(**shape)
    transformer.requires_grad_(False)
    return transformer if dtype == torch.float32 else transformer.to(dtype)


def measure(transformer, shape: dict, batch: int, resolution: int, checkpointing: bool, steps: int, warmup: int,
            device, dtype) -> dict:
    import torch
    import torch.nn.functional as F

    from sd_trainer.profile import StepProfile

    if checkpointing:
        transformer.enable_gradient_checkpointing()
    else:
        transformer.disable_gradient_checkpointing()
    transformer.train()
    parameters = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)
    latent = resolution // 8
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    timings = []
    profile = StepProfile(torch.cuda.synchronize if cuda else None, skip=warmup)
    for step in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        profile.begin_step()
        with profile.phase("data"):
            latents = torch.randn(batch, shape["in_channels"], latent, latent, device=device)
            noise = torch.randn_like(latents)
            sigma = torch.rand(batch, device=device).view(-1, 1, 1, 1)
            embeds = torch.randn(batch, CLIP_TOKENS + T5_TOKENS, shape["joint_attention_dim"], device=device,
                                 dtype=dtype)
            pooled = torch.randn(batch, shape["pooled_projection_dim"], device=device, dtype=dtype)
        with profile.phase("forward"):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                prediction = transformer(hidden_states=((1 - sigma) * latents + sigma * noise).to(dtype),
                                         timestep=sigma.flatten() * 1000, encoder_hidden_states=embeds,
                                         pooled_projections=pooled, return_dict=False)[0]
            loss = F.mse_loss(prediction.float(), noise - latents)
        with profile.phase("backward"):
            loss.backward()
        with profile.phase("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        profile.end_step()
        if cuda:
            torch.cuda.synchronize()
        if step >= warmup:
            timings.append(time.perf_counter() - started)
    del optimizer
    result = {"batch": batch, "checkpointing": checkpointing, "s_per_step": round(statistics.median(timings), 4),
              "phases": profile.summary()}
    if cuda:
        result["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        result["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model on the CPU, fp32 (smoke test)")
    parser.add_argument("--resolution", type=int, default=None, help="px (default 1024; 64 with --tiny)")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="default 1 2 4 (1 2 with --tiny)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 5; 1 with --tiny)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--json", action="store_true", help="print only the JSON result")
    args = parser.parse_args(argv)

    import torch

    from sd_trainer import device as device_facts
    from sd_trainer import model
    from sd_trainer.config import LORA_TARGETS
    from sd_trainer.profile import table

    if args.tiny:
        device, dtype, shape = torch.device("cpu"), torch.float32, TINY
        resolution, batches, steps, warmup = args.resolution or 64, args.batches or [1, 2], args.steps or 1, min(args.warmup, 1)
    else:
        problem = device_facts.cuda_problem()
        if problem:
            print(f"gpu_bench: no usable CUDA device ({problem}); nothing measured. "
                  "Run it on a GPU machine, or with --tiny for a CPU smoke run.")
            return 0
        device, dtype, shape = torch.device("cuda"), torch.bfloat16, SD35_MEDIUM
        resolution, batches, steps, warmup = args.resolution or 1024, args.batches or [1, 2, 4], args.steps or 5, args.warmup

    started = time.perf_counter()
    transformer = build_transformer(shape, device, dtype)
    base_parameters = sum(p.numel() for p in transformer.parameters())
    model.add_lora(transformer, args.lora_rank, None, 0.0, LORA_TARGETS["attention"])
    transformer.to(device)
    built_s = time.perf_counter() - started
    rows = []
    for checkpointing in (False, True):
        for batch in batches:
            try:
                rows.append(measure(transformer, shape, batch, resolution, checkpointing, steps, warmup, device, dtype))
            except torch.cuda.OutOfMemoryError:
                rows.append({"batch": batch, "checkpointing": checkpointing, "s_per_step": None, "oom": True})
                torch.cuda.empty_cache()
    summary = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "dtype": str(dtype).replace("torch.", ""), "resolution": resolution,
        "model": "tiny" if args.tiny else "sd3.5-medium-shaped (random weights)", "parameters": base_parameters,
        "lora_rank": args.lora_rank, "build_s": round(built_s, 1), "timed_steps": steps, "rows": rows,
    }
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    print(f"{summary['model']}, {base_parameters / 1e9:.2f} B parameters, {summary['device']}, {summary['dtype']}, "
          f"{resolution} px, LoRA rank {args.lora_rank}, median of {steps} steps")
    print(f"{'batch':>5} {'checkpointing':>13} {'s/step':>8} {'peak alloc GiB':>15} {'peak reserved GiB':>18}")
    for row in rows:
        seconds = "OOM" if row.get("oom") else f"{row['s_per_step']:.3f}"
        print(f"{row['batch']:5d} {'on' if row['checkpointing'] else 'off':>13} {seconds:>8} "
              f"{row.get('peak_allocated_gib', '-'):>15} {row.get('peak_reserved_gib', '-'):>18}")
    measured = {f"b{row['batch']}{' ckpt' if row['checkpointing'] else ''}": row["phases"]
                for row in rows if "phases" in row}
    if measured:
        print(table(measured))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
