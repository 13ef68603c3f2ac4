"""A method image's GPU facts: from its lock (torch, CUDA runtime, cuDNN) and, once per environment
layer, from torch itself (the GPU architectures it was compiled for).

The architectures are read when the environment layer is made, and kept in the layer's cache record.
So they become image labels at assembly: the image ID stays a function of the inputs, the facts
travel with the image (export, push), and a no-op build reads nothing. Two ways, the cheap one first:

- from torch's files, without running them (archs_from_files): the compile-time arch flags that
  `torch._C._cuda_getArchFlags()` returns are one string literal in torch/lib/libtorch_python.so;
  a scan of its bytes takes ~0.1 s where importing torch from a prefix without bytecode took 6.5 s.
  Per-distribution layers: in the install step itself, between install and split (FILES_SCRIPT);
  conda's one layer: on the host;
- when the scan cannot tell (not a CUDA wheel it recognises), by importing torch: the layer's own
  Python in a container of the base image with the new environment mounted read-only and no network
  (no GPU needed: torch reports its compile-time arch flags).
"""

from __future__ import annotations

import json
import mmap
import os
import re
import stat
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


# torch/csrc/cuda/Module.cpp: `_cuda_getArchFlags` returns C10_STRINGIZE(CUDA_ARCH_FLAGS), a literal such as
# "sm_75 sm_80 sm_86 sm_90 sm_100 sm_120" in libtorch_python.so. Checked on the CUDA wheels of torch 2.0.1,
# 2.2.2, 2.4.1, 2.5.1, 2.6.0, 2.7.1, 2.8.0, 2.10.0, 2.12.0, 2.13.0 and 2.14.1: one such string each, and
# no other string ends in arch names; the CPU wheel of 2.13.0 has none, nor either CUDA method name.
_ARCH_TOKEN = r"(?:sm|compute)_[0-9]+[a-z]?"
_ARCH_RUN = re.compile(rf"{_ARCH_TOKEN}(?: {_ARCH_TOKEN})*\Z".encode())
_CUDA_NAMES = (b"_cuda_getArchFlags", b"_cuda_getDeviceCount")   # torch._C's methods when built with CUDA
_TORCH_GPU_LIBS = ("libtorch_cuda", "libc10_cuda", "libtorch_hip", "libc10_hip")
_LONGEST = 4096


def _strings_with(data: bytes | mmap.mmap, needle: bytes) -> set[bytes]:
    """The NUL-terminated strings of a binary that contain `needle` (from the NUL before, at most _LONGEST bytes)."""
    found: set[bytes] = set()
    at = data.find(needle)
    while at >= 0:
        start = data.rfind(b"\0", max(0, at - _LONGEST), at) + 1
        end = data.find(b"\0", at, at + _LONGEST)
        if start > 0 and end >= 0:
            found.add(bytes(data[start:end]))
        at = data.find(needle, at + 1)
    return found


def _arch_flags(text: bytes) -> bytes | None:
    """The arch names a string ends in, when they are a string of their own: the whole string, or glued to a
    character array without a terminating NUL before it (torch 2.8.0: `...std::string ipc_hsm_70 sm_75...`),
    never words of a sentence (`use sm_80`, `arch=sm_80`)."""
    found = _ARCH_RUN.search(text)
    if found is None:
        return None
    before = text[found.start() - 1:found.start()]
    return found.group() if not before or before.isalnum() else None


def archs_in_library(data: bytes | mmap.mmap, gpu_libs: bool) -> list[str] | None:
    """torch's arch flags as `ARCH_SCRIPT` reports them, read from libtorch_python.so's bytes; None when they
    cannot be told apart (then torch is imported). `gpu_libs`: torch/lib has a CUDA or ROCm library.

    A CUDA build: exactly one string of arch names, beside torch._C's CUDA method names. A CPU build: no
    such string, no CUDA method name and no GPU library ([]). Anything else is for the import to say.
    """
    flags = {found for needle in (b"sm_", b"compute_") for text in _strings_with(data, needle)
             for found in [_arch_flags(text)] if found is not None}
    names = {text for text in _strings_with(data, b"_cuda_get") if text in _CUDA_NAMES}
    if len(flags) == 1 and names == set(_CUDA_NAMES):
        return sorted(flags.pop().decode("ascii").split())
    if not flags and not names and not gpu_libs:
        return []
    return None


def archs_from_files(prefix: Path) -> list[str] | None:
    """torch's GPU architectures read from its files in the environment at `prefix`, running nothing of it
    (see archs_in_library); None when that cannot tell (no single torch, a link, an unknown build)."""
    found = sorted(prefix.glob("lib/python*/site-packages/torch/lib/libtorch_python.so"))
    if len(found) != 1:
        return None
    library = found[0]
    try:   # package files: a regular file inside the prefix, never a link out of it (nor a FIFO)
        if not library.parent.resolve().is_relative_to(prefix.resolve()):
            return None
        fd = os.open(library, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size == 0:
            return None
        gpu_libs = any(entry.name.startswith(_TORCH_GPU_LIBS) for entry in os.scandir(library.parent))
        with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as data:
            return archs_in_library(data, gpu_libs)
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)


FILES_MARK = "ENVMGR-GPU-FACTS-FROM-FILES "


def _files_script() -> str:
    """archs_from_files as a script for the base's Python (`python -S -I -B archs.py <prefix>`), so the install
    step reads the facts itself and goes on to the split in the same container (one container less): prints
    FILES_MARK and the list, exit 0; exit 1 when the bytes cannot tell (then torch is imported, boxed). It
    reads package files and runs none of them, as the split beside it does."""
    import inspect

    functions = "\n\n".join(inspect.getsource(f) for f in (_strings_with, _arch_flags, archs_in_library,
                                                            archs_from_files))
    return "\n".join([
        "from __future__ import annotations",
        "import json, mmap, os, re, stat, sys",
        "from pathlib import Path",
        f"_ARCH_RUN = re.compile({_ARCH_RUN.pattern!r})",
        f"_CUDA_NAMES = {_CUDA_NAMES!r}",
        f"_TORCH_GPU_LIBS = {_TORCH_GPU_LIBS!r}",
        f"_LONGEST = {_LONGEST!r}",
        functions,
        "try:",
        "    found = archs_from_files(Path(sys.argv[1]))",
        "except Exception:   # noqa: BLE001 - whatever it is, the import says",
        "    found = None",
        "if found is None:",
        "    sys.exit(1)",
        f"print({FILES_MARK!r} + json.dumps(found), flush=True)",
        ""])


FILES_SCRIPT = _files_script()   # made once, from the functions above as defined (not as later patched)


def lock_facts(spec: MethodSpec) -> ImageGpuFacts:
    """What the lock says (no engine): torch, CUDA runtime, cuDNN."""
    pins = get_backend(spec).summary(spec).get("pins") or {}
    return facts_from_pins(pins, spec.virtual_packages)


def read_archs(ctx: Context, spec: MethodSpec, base: BaseImage, prefix: Path) -> list[str]:
    """torch's GPU architectures in the environment installed at `prefix` ([] without a CUDA torch)."""
    if not lock_facts(spec).torch:
        return []
    archs = archs_from_files(prefix)
    if archs is not None:
        return archs
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
