"""Which device to train on, and what the host asked for (`ENVMGR_GPUS`).

envmgr sets `ENVMGR_GPUS` to the GPUs it requested (`all`, a count like `2`, indices like
`0,1`; unset or `none` for CPU). When GPUs were asked for and CUDA is not usable, training
stops at once with torch's own reason rather than running for hours on the CPU.
"""

from __future__ import annotations

import os

import torch

GPU_REQUEST_VARIABLE = "ENVMGR_GPUS"
CHECKPOINTING_FROM_RESOLUTION = 768  # SD3.5-medium at 1024 px, batch 2, exceeds 22 GiB without it


class DeviceError(Exception):
    """GPUs were requested but cannot be used; the message is one line with torch's reason."""


def requested_gpus(value: str | None) -> int | None:
    """None: no GPU asked for; 0: `all`; N: that many (a count or a list of indices)."""
    text = (value or "").strip().lower()
    if text in ("", "none", "void"):
        return None
    if text == "all":
        return 0
    if "," in text or not text.isdigit():
        return len([part for part in text.split(",") if part.strip()])
    return int(text)


def cuda_problem() -> str | None:
    """Why CUDA cannot be used here, in torch's words; None when it can."""
    try:
        torch.cuda.init()  # raises with the real cause: no driver, driver too old, CPU-only build
    except Exception as error:  # torch raises RuntimeError, AssertionError or its own types here
        return " ".join(str(error).split()) or type(error).__name__
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False"
    return None


def check_gpu_request(environ: dict | None = None) -> None:
    """Raise DeviceError when GPUs were requested and CUDA is unusable or shows too few devices."""
    environ = os.environ if environ is None else environ
    raw = environ.get(GPU_REQUEST_VARIABLE)
    wanted = requested_gpus(raw)
    if wanted is None:
        return
    problem = cuda_problem()
    if problem:
        raise DeviceError(f"{GPU_REQUEST_VARIABLE}={raw} asks for GPUs but CUDA is not usable: {problem}")
    visible = torch.cuda.device_count()
    if wanted and visible < wanted:
        raise DeviceError(f"{GPU_REQUEST_VARIABLE}={raw} asks for {wanted} GPU(s) but CUDA sees {visible}")


def gradient_checkpointing_wanted(configured: bool | None, resolution: int) -> bool:
    """Explicit setting wins; otherwise on for large images, off for small CPU runs."""
    if configured is not None:
        return configured
    return resolution >= CHECKPOINTING_FROM_RESOLUTION
