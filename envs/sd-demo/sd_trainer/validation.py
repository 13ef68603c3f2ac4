"""Validation images: each validation prompt rendered with its cached embedding and a fixed seed.

Prompt i always uses seed `validation_seed + i` (default: `seed + i`), so images of the same
prompt at different steps differ only by what the LoRA learned.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import torch

from . import model

log = logging.getLogger("sd_trainer")


def image_name(step: int, number: int) -> str:
    """`step-000015.png` for the first prompt (as before), `step-000015-1.png` for the second, ..."""
    return f"step-{step:06d}.png" if number == 0 else f"step-{step:06d}-{number}.png"


@torch.no_grad()
def render(transformer, config, training_set, step: int, device, dtype, autocast) -> Iterator[tuple[int, Path, int]]:
    """Yields (prompt number, image path, seed) for every validation prompt."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    model_path = config.pretrained_model_name_or_path
    vae = model.load_vae(model_path, dtype, device)
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(model_path, subfolder="scheduler", local_files_only=True),
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
    )
    pipeline.set_progress_bar_config(disable=True)
    negative = torch.tensor([training_set.prompt_id(config.validation_negative_prompt)])
    negative_embeds, negative_pooled = training_set.prompt_embeddings(negative)
    width, height = config.validation_resolution or (config.resolution, config.resolution)
    first_seed = config.validation_seed if config.validation_seed is not None else config.seed
    folder = Path(config.output_dir) / "validation_images"
    folder.mkdir(parents=True, exist_ok=True)
    was_training = transformer.training
    transformer.eval()
    try:
        for number, prompt in enumerate(config.validation_prompts):
            embeds, pooled = training_set.prompt_embeddings(torch.tensor([training_set.prompt_id(prompt)]))
            with autocast():
                image = pipeline(
                    prompt_embeds=embeds.to(device, dtype),
                    pooled_prompt_embeds=pooled.to(device, dtype),
                    negative_prompt_embeds=negative_embeds.to(device, dtype),
                    negative_pooled_prompt_embeds=negative_pooled.to(device, dtype),
                    guidance_scale=config.validation_guidance,
                    num_inference_steps=config.validation_num_inference_steps,
                    height=height, width=width,
                    generator=torch.Generator().manual_seed(first_seed + number),
                ).images[0]
            target = folder / image_name(step, number)
            image.save(target)
            yield number, target, first_seed + number
    finally:
        transformer.train(was_training)
        del pipeline, vae
        model.release_memory()
