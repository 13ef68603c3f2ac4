"""Is this a diffusers SD3 folder? (torch-free, so the entry script can check before launching)."""

from __future__ import annotations

import json
from pathlib import Path

SD3_PIPELINES = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline")
REQUIRED_PARTS = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")


class ModelError(Exception):
    """The base model folder is missing or is not a diffusers SD3 folder."""


def check_model_folder(path: Path) -> dict:
    """The folder's model_index.json, after checking it is a diffusers SD3 pipeline folder."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model folder {path} does not exist")
    if not path.is_dir():
        raise ModelError(f"model path {path} is not a folder (expected a diffusers StableDiffusion3Pipeline folder)")
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise ModelError(f"model folder {path} has no model_index.json (expected a diffusers StableDiffusion3Pipeline folder)")
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ModelError(f"{index_file}: invalid JSON ({error})") from None
    pipeline_class = index.get("_class_name", "?")
    if pipeline_class not in SD3_PIPELINES:
        raise ModelError(f"model folder {path} holds a {pipeline_class}, not a StableDiffusion3Pipeline (SD3 / SD3.5)")
    missing = [part for part in REQUIRED_PARTS if not (path / part).is_dir()]
    if missing:
        raise ModelError(f"model folder {path} lacks {', '.join(missing)}/ (incomplete SD3 download?)")
    return index


def has_t5(path: Path) -> bool:
    index = json.loads((Path(path) / "model_index.json").read_text(encoding="utf-8"))
    entry = index.get("text_encoder_3")
    return bool(entry and entry[0] is not None and (Path(path) / "text_encoder_3").is_dir())
