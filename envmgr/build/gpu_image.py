"""A method image's GPU facts: from its lock (torch, CUDA runtime, cuDNN) and, once per environment
layer, from torch itself (the GPU architectures it was compiled for).

The architectures are read when the environment layer is made, by the layer's own Python in a
container of the base image with the new environment mounted read-only and no network (no GPU
needed: torch reports its compile-time arch flags), and kept in the layer's cache record. So they
become image labels at assembly: the image ID stays a function of the inputs, the facts travel with
the image (export, push), and a no-op build reads nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from envmgr.core import paths
from envmgr.core.gpu import ImageGpuFacts, facts_from_pins
from envmgr.core.spec import MethodSpec
from envmgr.door.containers import BindMount, ContainerSpec
from envmgr.door.context import Context
from envmgr.images.base import BaseImage
from envmgr.lock.backends import get_backend

_MARK = "ENVMGR-GPU-FACTS "
# torch's compile-time arch flags, read directly: torch.cuda.get_arch_list() returns [] without a
# GPU in torch 2.10.0 (measured: its cu128 wheel, no GPU) though not in 2.13.0.
ARCH_SCRIPT = f"""
import importlib.util, json
archs = []
if importlib.util.find_spec("torch") is not None:
    import torch
    if torch.cuda._is_compiled():
        read = getattr(torch._C, "_cuda_getArchFlags", None)
        flags = read() if read else None
        archs = flags.split() if flags else torch.cuda.get_arch_list()
print({_MARK!r} + json.dumps(sorted(archs)))
"""


def lock_facts(spec: MethodSpec) -> ImageGpuFacts:
    """What the lock says (no engine): torch, CUDA runtime, cuDNN."""
    pins = get_backend(spec).summary(spec).get("pins") or {}
    return facts_from_pins(pins, spec.virtual_packages)


def read_archs(ctx: Context, spec: MethodSpec, base: BaseImage, prefix: Path) -> list[str]:
    """torch's GPU architectures in the environment installed at `prefix` ([] without a CUDA torch)."""
    if not lock_facts(spec).torch:
        return []
    return read_archs_boxed(ctx, spec.name, base, prefix, spec.env_prefix)


def read_archs_boxed(ctx: Context, method: str, base: BaseImage, prefix: Path, container_prefix: str) -> list[str]:
    """Import torch from the environment at `prefix` (mounted read-only at `container_prefix`) to read its
    GPU architectures: package code, so in a container of its own with no network, no credentials and
    nothing writable (not in the install step, which has the network, the netrc and the uv cache)."""
    lines: list[str] = []
    container = ContainerSpec(
        image=base.image_id, command=[f"{container_prefix}/bin/python", "-B", "-c", ARCH_SCRIPT],
        env={"HOME": "/tmp", "CUDA_VISIBLE_DEVICES": "", "PYTHONDONTWRITEBYTECODE": "1"},
        mounts=[BindMount(prefix, container_prefix, read_only=True)],
        user=f"{os.getuid()}:{os.getgid()}", network="none",
        labels={paths.LABEL_KIND: "step", paths.LABEL_METHOD: method}).hardened()
    code = ctx.engine.run(container, on_line=lines.append).exit_code
    found = [line[len(_MARK):] for line in lines if line.startswith(_MARK)]
    if code != 0 or not found:
        ctx.ui.warn(f"{method}: could not read torch's GPU architectures (exit {code}): "
                    + " | ".join(lines[-3:]))
        return []
    return list(json.loads(found[-1]))


def image_labels(spec: MethodSpec, archs: list[str]) -> dict[str, str]:
    facts = lock_facts(spec)
    labels = ImageGpuFacts(torch=facts.torch, cuda=facts.cuda, cudnn=facts.cudnn, archs=tuple(archs)).to_labels()
    if spec.variant:
        labels[paths.LABEL_VARIANT] = spec.variant
    return labels
