"""Validation images: a few denoising steps with the cached validation prompt embedding."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from . import model

log = logging.getLogger("sd_trainer")


@torch.no_grad()
def render(transformer, config, training_set, step: int, device, dtype, autocast) -> Path:
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    model_path = config.pretrained_model_name_or_path
    vae = model.load_vae(model_path, dtype, device)
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(model_path, subfolder="scheduler", local_files_only=True),
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
    )
    pipeline.set_progress_bar_config(disable=True)
    prompt = training_set.prompt_id(config.validation_prompt or "")
    negative = training_set.prompt_id(config.validation_negative_prompt)
    size = config.validation_resolution or config.resolution
    was_training = transformer.training
    transformer.eval()
    try:
        with autocast():
            image = pipeline(
                prompt_embeds=training_set.prompt_embeds[prompt : prompt + 1].to(device, dtype),
                pooled_prompt_embeds=training_set.pooled_embeds[prompt : prompt + 1].to(device, dtype),
                negative_prompt_embeds=training_set.prompt_embeds[negative : negative + 1].to(device, dtype),
                negative_pooled_prompt_embeds=training_set.pooled_embeds[negative : negative + 1].to(device, dtype),
                guidance_scale=config.validation_guidance,
                num_inference_steps=config.validation_num_inference_steps,
                height=size, width=size,
                generator=torch.Generator().manual_seed(config.validation_seed if config.validation_seed is not None else config.seed),
            ).images[0]
    finally:
        transformer.train(was_training)
        del pipeline, vae
        model.release_memory()
    folder = Path(config.output_dir) / "validation_images"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"step-{step:06d}.png"
    image.save(target)
    return target
