"""Training data: find image/caption pairs, size them, and cache latents + text embeddings once.

After `build_training_set` returns, the VAE and the three text encoders are gone from
memory; every training step reads only cached tensors. The caches are also written
to `cache_dir_vae` / the text_embeds `cache_dir` (keyed by a fingerprint of the
inputs), so a resumed run skips encoding altogether.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import model
from .config import TrainConfig
from .dataset_prep import IMAGE_EXTENSIONS, REPORT_NAME, is_junk

log = logging.getLogger("sd_trainer")
CACHE_FORMAT = 1


class DataError(Exception):
    """The training data cannot be used; one line naming the folder or the filter."""


@dataclass
class Sample:
    path: Path
    caption: str
    repeats: int = 0


@dataclass
class TrainingSet:
    latents: torch.Tensor  # [N, C, h, w] fp32, already shifted and scaled
    caption_ids: torch.Tensor  # [N] index into prompt_embeds
    prompt_embeds: torch.Tensor  # [M, L, D]
    pooled_embeds: torch.Tensor  # [M, P]
    prompts: list[str]  # M texts; EMPTY_PROMPT_ID is "" (caption dropout, negative prompt)
    order: torch.Tensor  # sample index per epoch position, repeats expanded
    report: dict = field(default_factory=dict)

    def prompt_id(self, text: str) -> int:
        return self.prompts.index(text)


EMPTY_PROMPT_ID = 0


# ---------------------------------------------------------------- discovery


def discover(config: TrainConfig, report: dict) -> list[Sample]:
    samples = []
    for backend in config.image_backends:
        folder = backend.instance_data_dir
        if not folder.is_dir():
            raise DataError(f"instance_data_dir {folder} (backend {backend.id}) does not exist")
        found = 0
        for path in sorted(folder.rglob("*")):
            relative = path.relative_to(folder).as_posix()
            if not path.is_file() or path.suffix.lower() not in IMAGE_EXTENSIONS or is_junk(relative):
                continue
            found += 1
            caption = _caption(path, backend)
            if not caption:
                _skip(report, "no_caption", relative)
                continue
            samples.append(Sample(path, caption, backend.repeats))
        if found == 0:
            raise DataError(f"instance_data_dir {folder} (backend {backend.id}) holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return samples


def _caption(path: Path, backend) -> str:
    if backend.caption_strategy == "instanceprompt":
        return (backend.instance_prompt or "").strip()
    if backend.caption_strategy == "filename":
        return path.stem.replace("_", " ").strip()
    text = path.with_suffix(".txt")
    if not text.is_file():
        return ""
    return " ".join(text.read_text(encoding="utf-8-sig", errors="replace").split())


def _skip(report: dict, reason: str, name: str) -> None:
    report.setdefault("skipped", {})
    report["skipped"][reason] = report["skipped"].get(reason, 0) + 1
    examples = report.setdefault("examples", {}).setdefault(reason, [])
    if len(examples) < 5:
        examples.append(name)


# ---------------------------------------------------------------- pixels


def load_pixels(path: Path, resolution: int, minimum_size: int | None) -> tuple[torch.Tensor | None, str]:
    """([3, R, R] in [-1, 1] or None, status) with status in ok / upscaled / too_small / unreadable.

    The short side is resized to R (up or down) and the centre square is kept.
    """
    import numpy as np
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened)
            image.load()
    except Exception:  # Pillow raises many types for broken files
        return None, "unreadable"
    if image.mode in ("RGBA", "LA", "P"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    image = image.convert("RGB")
    short_side = min(image.size)
    if minimum_size and short_side < minimum_size:
        return None, "too_small"
    status = "upscaled" if short_side < resolution else "ok"
    scale = resolution / short_side
    width, height = max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))
    image = image.resize((width, height), Image.Resampling.BICUBIC if status == "upscaled" else Image.Resampling.LANCZOS)
    left, top = (width - resolution) // 2, (height - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous(), status


# ---------------------------------------------------------------- caching


def _fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _folder_signature(folder: Path) -> list:
    return [(p.name, p.stat().st_size) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []


def _load_cache(path: Path | None, key: str):
    if path is None or not path.is_file():
        return None
    try:
        cached = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a half-written or foreign file is just a cache miss
        log.warning("ignoring unreadable cache %s (%s)", path, error)
        return None
    return cached if cached.get("key") == key else None


def _save_cache(path: Path | None, payload: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(payload, temporary)
    os.replace(temporary, path)


def _encode_latents(config, samples, minimum_size, device, dtype, report, stop):
    vae = model.load_vae(config.pretrained_model_name_or_path, dtype, device)
    kept, latents, batch, batch_ids = [], [], [], []
    for number, sample in enumerate(samples):
        if stop():
            return None, None
        pixels, status = load_pixels(sample.path, config.resolution, minimum_size)
        if pixels is None:
            _skip(report, status, sample.path.name)
            continue
        if status == "upscaled":
            report["upscaled"] = report.get("upscaled", 0) + 1
        batch.append(pixels)
        batch_ids.append(number)
        if len(batch) == config.vae_batch_size or number == len(samples) - 1:
            latents.append(model.encode_images(vae, torch.stack(batch)))
            kept.extend(batch_ids)
            batch, batch_ids = [], []
    if batch:
        latents.append(model.encode_images(vae, torch.stack(batch)))
        kept.extend(batch_ids)
    del vae
    model.release_memory()
    return kept, (torch.cat(latents) if latents else None)


def build_training_set(config: TrainConfig, accelerator, dtype: torch.dtype, stop) -> TrainingSet | None:
    """Discover, filter, encode (or load from cache). Returns None if stopped by a signal."""
    report: dict = {"skipped": {}, "upscaled": 0}
    samples = discover(config, report)
    minimum_size = next((b.minimum_image_size for b in config.image_backends if b.minimum_image_size), None)
    minimum_size = minimum_size or config.minimum_image_size
    model_path = Path(config.pretrained_model_name_or_path)
    device = accelerator.device

    # content hashes, not mtimes: the entry script re-extracts the dataset on every run
    files = [(s.path.name, hashlib.sha1(s.path.read_bytes()).hexdigest()) for s in samples]
    latent_key = _fingerprint(CACHE_FORMAT, str(model_path.resolve()), _folder_signature(model_path / "vae"),
                              config.resolution, minimum_size, files, str(dtype))
    backend_cache = next((b.cache_dir_vae for b in config.image_backends if b.cache_dir_vae), None)
    latent_file = backend_cache / f"latents-{latent_key}.pt" if backend_cache else None

    with accelerator.main_process_first():
        cached = _load_cache(latent_file, latent_key)
        if cached is None:
            log.info("encoding %d images with the VAE at %d px", len(samples), config.resolution)
            kept, latents = _encode_latents(config, samples, minimum_size, device, dtype, report, stop)
            if kept is None:
                return None
            cached = {"key": latent_key, "kept": kept, "latents": latents, "report": report}
            if latents is not None and accelerator.is_main_process:
                _save_cache(latent_file, cached)
        else:
            log.info("using cached latents %s", latent_file)
    kept, latents, report = cached["kept"], cached["latents"], cached["report"]

    if not kept:
        raise DataError(_zero_usable_message(config, samples, report, minimum_size))
    samples = [samples[i] for i in kept]

    prompts = [""]
    for text in [s.caption for s in samples] + [config.validation_prompt or "", config.validation_negative_prompt]:
        if text not in prompts:
            prompts.append(text)
    text_key = _fingerprint(CACHE_FORMAT, str(model_path.resolve()),
                            [_folder_signature(model_path / part) for part in ("text_encoder", "text_encoder_2", "text_encoder_3")],
                            config.tokenizer_max_length, prompts, str(dtype))
    text_file = config.text_cache_dir / f"text-{text_key}.pt" if config.text_cache_dir else None
    with accelerator.main_process_first():
        cached_text = _load_cache(text_file, text_key)
        if cached_text is None:
            if stop():
                return None
            log.info("encoding %d distinct prompts with CLIP-L, CLIP-G and T5", len(prompts))
            pipeline = model.load_text_pipeline(model_path, dtype, device)
            embeds, pooled = model.encode_prompts(pipeline, prompts, config.tokenizer_max_length, device)
            del pipeline
            model.release_memory()
            cached_text = {"key": text_key, "embeds": embeds, "pooled": pooled}
            if accelerator.is_main_process:
                _save_cache(text_file, cached_text)
        else:
            log.info("using cached text embeddings %s", text_file)

    caption_ids = torch.tensor([prompts.index(s.caption) for s in samples], dtype=torch.long)
    order = torch.cat([torch.full((s.repeats + 1,), i, dtype=torch.long) for i, s in enumerate(samples)])
    report = _final_report(config, report, len(samples))
    return TrainingSet(latents, caption_ids, cached_text["embeds"], cached_text["pooled"], prompts, order, report)


def _final_report(config: TrainConfig, report: dict, usable: int) -> dict:
    """Merge the entry script's preparation report (skips while unpacking) with ours."""
    merged = {"images": usable, "skipped": dict(report.get("skipped", {})), "upscaled": report.get("upscaled", 0)}
    examples = dict(report.get("examples", {}))
    for backend in config.image_backends:
        prep_file = backend.instance_data_dir / REPORT_NAME
        if prep_file.is_file():
            prep = json.loads(prep_file.read_text(encoding="utf-8"))
            for reason, count in prep.get("skipped", {}).items():
                merged["skipped"][reason] = merged["skipped"].get(reason, 0) + count
            for reason, names in prep.get("examples", {}).items():
                examples.setdefault(reason, names)
    merged["examples"] = examples
    if merged["upscaled"]:
        log.warning("%d images are smaller than %d px and were upscaled (set minimum_image_size to drop them instead)",
                    merged["upscaled"], config.resolution)
    return merged


def _zero_usable_message(config, samples, report, minimum_size) -> str:
    skipped = report.get("skipped", {})
    if not samples:
        names = ", ".join(report.get("examples", {}).get("no_caption", []))
        return f"no image in {', '.join(str(b.instance_data_dir) for b in config.image_backends)} has a caption (e.g. {names})"
    if skipped.get("too_small"):
        return (f"minimum_image_size={minimum_size} rejected {skipped['too_small']} of {len(samples)} images "
                f"(e.g. {', '.join(report['examples']['too_small'][:3])}); no usable image is left - lower or remove "
                "minimum_image_size (smaller images are upscaled to the training resolution)")
    return f"all {len(samples)} images are unreadable (e.g. {', '.join(report.get('examples', {}).get('unreadable', [])[:3])})"


# ---------------------------------------------------------------- sampling


class BatchPlan:
    """Which samples each process sees at each optimizer step: a pure function of (seed, step).

    The sample order is a fresh permutation every epoch; because nothing depends on
    iteration history, a resumed run sees exactly the batches an uninterrupted one would.
    """

    def __init__(self, order: torch.Tensor, batch_size: int, accumulation: int, processes: int, seed: int):
        self.order, self.batch_size, self.accumulation = order, batch_size, accumulation
        self.processes, self.seed = processes, seed
        self._permutations: dict[int, torch.Tensor] = {}

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._permutations:
            generator = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            self._permutations = {epoch: torch.randperm(len(self.order), generator=generator)}
        return self._permutations[epoch]

    def indices(self, step: int, micro: int, rank: int) -> torch.Tensor:
        global_batch = self.batch_size * self.processes
        first = ((step - 1) * self.accumulation + micro) * global_batch + rank * self.batch_size
        positions = range(first, first + self.batch_size)
        picked = [self.order[self._permutation(p // len(self.order))[p % len(self.order)]] for p in positions]
        return torch.stack(picked)

    def steps_per_epoch(self) -> int:
        return max(1, -(-len(self.order) // (self.batch_size * self.processes * self.accumulation)))


def step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """The noise/timestep RNG of one micro-batch on one process, independent of history."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 1_009 + micro * 31 + rank) % (2**63))
