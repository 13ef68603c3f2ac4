"""Saving: the final LoRA file, and atomic `checkpoint-<step>/` folders for resuming.

A checkpoint is written into `.checkpoint-<step>.tmp/` and renamed into place only
when complete, so a crash or a full disk never leaves a broken latest checkpoint.

torch.save and safetensors' writer do not raise OSError when the disk fills (a RuntimeError, a
SafetensorError): tensors are serialized in memory and written here, so a full disk is an OSError
(ENOSPC) that the loop can tell apart from a bug.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
from pathlib import Path

import safetensors.torch
import torch
from safetensors.torch import load_file

from . import model

log = logging.getLogger("sd_trainer")
LORA_FILE = "pytorch_lora_weights.safetensors"
COMFYUI_FILE = "pytorch_lora_weights_comfyui.safetensors"
PEFT_FILE = "lora_peft.safetensors"
STATE_FILE = "training_state.pt"
META_FILE = "checkpoint.json"  # written last: its presence marks a complete checkpoint
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)


def _save_tensors(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    _write_bytes(path, safetensors.torch.save(tensors, metadata=metadata))


def _as_os_error(error: Exception, path: Path) -> Exception:
    """safetensors' `... (os error 28)` as the OSError it is; anything else unchanged."""
    found = re.search(r"os error (\d+)", str(error))
    return OSError(int(found.group(1)), os.strerror(int(found.group(1))), str(path)) if found else error


def save_lora(transformer, directory: Path) -> Path:
    """`pytorch_lora_weights.safetensors` in the format StableDiffusion3Pipeline.load_lora_weights reads,
    written beside under a temporary name and renamed: a full disk never leaves half a file under its name."""
    from diffusers import StableDiffusion3Pipeline

    directory.mkdir(parents=True, exist_ok=True)
    temporary = directory / f".{LORA_FILE}.tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        try:
            StableDiffusion3Pipeline.save_lora_weights(
                temporary,
                transformer_lora_layers=model.lora_state_dict(transformer),
                transformer_lora_adapter_metadata=model.lora_metadata(transformer),
                safe_serialization=True,
            )
        except Exception as error:  # noqa: BLE001 - re-raised, as OSError when it is one
            raise _as_os_error(error, temporary / LORA_FILE) from error
        _fsync_tree(temporary)
        os.replace(temporary / LORA_FILE, directory / LORA_FILE)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return directory / LORA_FILE


def save_comfyui_lora(transformer, directory: Path, alpha: float) -> Path:
    """The same LoRA with ComfyUI's key names (`lora_transformer_<module>.lora_down/up.weight`) and an
    `.alpha` tensor per module, so loaders that scale by alpha/rank apply it exactly as trained."""
    tensors: dict[str, torch.Tensor] = {}
    for key, value in model.lora_state_dict(transformer).items():
        module, kind = key.rsplit(".lora_", 1)
        name = "lora_transformer_" + module.replace(".", "_")
        tensors[f"{name}.lora_down.weight" if kind.startswith("A") else f"{name}.lora_up.weight"] = value
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha))
    target = directory / COMFYUI_FILE
    temporary = directory / f".{COMFYUI_FILE}.tmp"
    try:
        _save_tensors(tensors, temporary, metadata={"format": "pt"})
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
    return target


def _fsync_tree(directory: Path) -> None:
    for path in list(directory.iterdir()) + [directory]:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def save_checkpoint(output_dir: Path, step: int, transformer, optimizer, lr_scheduler, extra: dict) -> Path:
    final = output_dir / f"checkpoint-{step}"
    temporary = output_dir / f".checkpoint-{step}.tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    try:
        temporary.mkdir(parents=True)
        save_lora(transformer, temporary)
        _save_tensors(model.lora_state_dict(transformer), temporary / PEFT_FILE)
        state = io.BytesIO()
        torch.save(
            {"step": step, "optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
             "torch_rng": torch.get_rng_state(), **extra},
            state,
        )
        _write_bytes(temporary / STATE_FILE, state.getbuffer())
        (temporary / META_FILE).write_text(json.dumps({"step": step, "complete": True}) + "\n")
        _fsync_tree(temporary)
        previous = output_dir / f".checkpoint-{step}.old"
        if final.exists():
            shutil.rmtree(previous, ignore_errors=True)
            final.rename(previous)
        temporary.rename(final)
        shutil.rmtree(previous, ignore_errors=True)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return final


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    found = []
    if output_dir.is_dir():
        for path in output_dir.iterdir():
            match = CHECKPOINT_PATTERN.match(path.name)
            if match and (path / META_FILE).is_file() and (path / STATE_FILE).is_file():
                found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_resume(output_dir: Path, request: str | None) -> Path | None:
    """`latest` -> newest complete checkpoint (None if there is none); a path -> that checkpoint."""
    if not request:
        return None
    if request == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            log.info("resume_from_checkpoint=latest: no checkpoint in %s yet, starting from step 0", output_dir)
            return None
        return checkpoints[-1][1]
    path = Path(request)
    if not path.is_absolute() and not path.exists():
        path = output_dir / request
    if not (path / META_FILE).is_file():
        raise FileNotFoundError(f"resume_from_checkpoint={request}: {path} is not a complete checkpoint")
    return path


def load_checkpoint(path: Path, transformer, optimizer, lr_scheduler) -> dict:
    model.load_lora_state(transformer, load_file(str(path / PEFT_FILE)))
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return state


def prune(output_dir: Path, keep: int | None) -> None:
    if not keep or keep < 1:
        return
    for _step, path in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
