"""Loading a local diffusers SD3 folder, encoding images and prompts, attaching LoRA."""

from __future__ import annotations

import gc
import json
import logging
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from .model_folder import ModelError, check_model_folder, has_t5  # noqa: F401  (re-exported)

log = logging.getLogger("sd_trainer")


# ---------------------------------------------------------------- text


def load_text_pipeline(path: Path, dtype: torch.dtype, device: torch.device):
    """The SD3 pipeline with only its tokenizers and text encoders (no transformer, no VAE)."""
    from diffusers import StableDiffusion3Pipeline

    extra = {} if has_t5(path) else {"text_encoder_3": None, "tokenizer_3": None}
    pipeline = StableDiffusion3Pipeline.from_pretrained(
        path, transformer=None, vae=None, dtype=dtype, local_files_only=True, **extra
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


@torch.no_grad()
def encode_prompts(pipeline, prompts: list[str], max_length: int, device: torch.device, t5_padding: str = "unmodified",
                   batch_size: int = 8):
    """(prompt_embeds [N, L, D], pooled [N, P]) on CPU for every prompt, via the pipeline's own encoder.

    `t5_padding=zero` zeroes the T5 positions past each prompt's tokens (SimpleTuner's option).
    """
    embeds, pooled = [], []
    # diffusers logs the whole truncated tail of every long prompt: unbounded lines for long captions
    quiet = logging.getLogger("diffusers.pipelines.stable_diffusion_3")
    previous_level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            prompt_embeds, pooled_embeds = _encode_chunk(pipeline, chunk, max_length, device, t5_padding)
            embeds.append(prompt_embeds.cpu())
            pooled.append(pooled_embeds.cpu())
    finally:
        quiet.setLevel(previous_level)
    return torch.cat(embeds), torch.cat(pooled)


def _encode_chunk(pipeline, chunk: list[str], max_length: int, device: torch.device, t5_padding: str):
    prompt_embeds, _, pooled_embeds, _ = pipeline.encode_prompt(
        prompt=chunk, prompt_2=None, prompt_3=None, device=device,
        do_classifier_free_guidance=False, max_sequence_length=max_length,
    )
    if t5_padding == "zero" and pipeline.tokenizer_3 is not None:
        mask = pipeline.tokenizer_3(chunk, padding="max_length", max_length=max_length, truncation=True,
                                    return_tensors="pt").attention_mask
        t5_start = prompt_embeds.shape[1] - max_length  # CLIP tokens come first
        prompt_embeds[:, t5_start:] *= mask.unsqueeze(-1).to(prompt_embeds.device, prompt_embeds.dtype)
    return prompt_embeds, pooled_embeds


# ---------------------------------------------------------------- VAE


def load_vae(path: Path, dtype: torch.dtype, device: torch.device):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", dtype=dtype, local_files_only=True)
    vae.requires_grad_(False)
    return vae.to(device).eval()


@torch.no_grad()
def encode_images(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] -> training latents `(mean - shift_factor) * scaling_factor`.

    The posterior mean is used (not a sample) so the cache is deterministic.
    """
    pixels = pixels.to(device=vae.device, dtype=vae.dtype)
    latents = vae.encode(pixels).latent_dist.mean
    shift = vae.config.shift_factor or 0.0
    return ((latents - shift) * vae.config.scaling_factor).float().cpu()


# ---------------------------------------------------------------- transformer + LoRA


def load_transformer(path: Path, dtype: torch.dtype):
    from diffusers import SD3Transformer2DModel

    transformer = SD3Transformer2DModel.from_pretrained(path, subfolder="transformer", dtype=dtype, local_files_only=True)
    transformer.requires_grad_(False)
    return transformer


def add_lora(transformer, rank: int, alpha: float | None, dropout: float, target_modules: tuple[str, ...]):
    """Attach a peft LoRA adapter; LoRA weights stay fp32 even when the base is bf16."""
    from peft import LoraConfig

    present = {name.rsplit(".", 1)[-1] for name, _ in transformer.named_modules()} | {
        name.split(".")[-2] + "." + name.split(".")[-1] for name, _ in transformer.named_modules() if name.count(".") >= 1
    }
    names = [name for name, _ in transformer.named_modules()]
    targets = [t for t in target_modules if t in present or any(name.endswith("." + t) for name in names)]
    if not targets:
        raise ModelError(f"transformer has none of the LoRA target modules {', '.join(target_modules)}")
    config = LoraConfig(
        r=rank, lora_alpha=alpha if alpha is not None else rank, lora_dropout=dropout,
        init_lora_weights="gaussian", target_modules=targets,
    )
    transformer.add_adapter(config)
    parameters = [p for p in transformer.parameters() if p.requires_grad]
    for parameter in parameters:
        parameter.data = parameter.data.float()
    for module in transformer.modules():
        direct_lora_forward(module)
    return parameters


def direct_lora_forward(layer, adapter: str = "default") -> bool:
    """Give a peft LoRA `Linear` a forward without peft's per-call bookkeeping; the same tensor ops.

    peft's `Linear.forward` checks its arguments, loops over the active adapters, casts and calls
    the LoRA `Linear`s and `Identity` dropout as modules, then multiplies by `scaling` even when it
    is 1; on a small model that Python work is a good part of the step. `_direct_forward` computes
    `base(x) + B(A(dropout(x))) [* scaling]` with the same kernels in the same order (`x * 1.0` and
    its gradient are exactly `x`, so the multiplication is left out only then): losses and the LoRA
    stay bit-identical (tests/method/test_step_identity.py). Whenever the layer is not in the plain
    one-adapter state it was installed for (adapters disabled or merged, another adapter active,
    extra arguments) it calls peft's own forward. Layers with a LoRA bias or a variant (DoRA) keep
    peft's forward. Returns whether it was installed.
    """
    from peft.tuners.lora import Linear as LoraLinear

    if type(layer) is not LoraLinear or adapter not in layer.lora_A or adapter in layer.lora_variant:
        return False
    lora_a, lora_b = layer.lora_A[adapter], layer.lora_B[adapter]
    if type(lora_a) is not torch.nn.Linear or type(lora_b) is not torch.nn.Linear or lora_a.bias is not None \
            or lora_b.bias is not None:
        return False
    layer.direct_adapter = adapter
    layer.forward = types.MethodType(_direct_forward, layer)  # a bound method: deepcopy rebinds it to the copy
    return True


def _direct_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    adapter = self.direct_adapter
    if args or kwargs or self.disable_adapters or self.merged or self.active_adapters != [adapter]:
        return type(self).forward(self, x, *args, **kwargs)  # peft's own
    result = self.base_layer(x)
    result_dtype, weight = result.dtype, self.lora_A[adapter].weight
    if x.dtype != weight.dtype and getattr(self, "cast_input_dtype_enabled", True):
        x = x.to(dtype=weight.dtype)
    dropout = self.lora_dropout[adapter]
    if type(dropout) is not torch.nn.Identity:
        x = dropout(x)
    update = F.linear(F.linear(x, weight), self.lora_B[adapter].weight)
    scaling = self.scaling[adapter]
    if scaling != 1:
        update = update * scaling
    result = result + update
    return result if result.dtype == result_dtype else result.to(result_dtype)


def lora_state_dict(transformer) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return {key: value.detach().float().cpu().contiguous() for key, value in get_peft_model_state_dict(transformer).items()}


def load_lora_state(transformer, state: dict[str, torch.Tensor]) -> None:
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(transformer, state)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ModelError(f"checkpoint LoRA does not fit this model ({len(unexpected)} unexpected keys, e.g. {unexpected[0]})")


def lora_metadata(transformer) -> dict:
    """The adapter's LoraConfig as plain JSON (diffusers stores it so alpha/rank survive loading)."""
    config = transformer.peft_config["default"].to_dict()
    return json.loads(json.dumps(config, default=lambda value: sorted(value) if isinstance(value, set) else str(value)))


def release_memory() -> None:
    """Return memory of models the caller has dropped its references to."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
