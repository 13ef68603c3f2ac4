"""GPUs: what `--gpus` asks for, what an image was built for, what the host has, and whether they fit.

This module decides; it never talks to the engine. `parse_gpus` is the one parser of `--gpus` for
every verb; host and image facts come in as plain dataclasses so the decisions can be tested with
real driver/CUDA/architecture values on a machine without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from envmgr.core import paths
from envmgr.core.errors import UsageError

GpuKind = Literal["all", "none", "count", "indices"]

_ACCEPTED = "expected all, none, a count such as 2, or distinct GPU indices such as 0,1"


@dataclass(frozen=True)
class GpuRequest:
    """What `--gpus` asked for: every GPU, none (the CPU), N of them, or these indices."""

    kind: GpuKind
    count: int | None = None
    indices: tuple[int, ...] = ()

    @property
    def wants_gpus(self) -> bool:
        return self.kind != "none"

    def env_value(self) -> str:
        """The value of ENVMGR_GPUS in the container: `all`, `none`, `3` or `0,1` (what the user asked)."""
        if self.kind == "count":
            return str(self.count)
        if self.kind == "indices":
            return ",".join(str(i) for i in self.indices)
        return self.kind

    def process_count(self, visible: int | None) -> int | None:
        """How many training processes this request means: one per GPU.

        `visible` is the number of GPUs the host has (None when unknown); `all` needs it to answer.
        The CPU is one process.
        """
        if self.kind == "none":
            return 1
        if self.kind == "count":
            return self.count
        if self.kind == "indices":
            return len(self.indices)
        return visible if visible else None

    def __str__(self) -> str:
        return self.env_value()


def parse_gpus(text: str) -> GpuRequest:
    """Parse `--gpus`: `all`, `none`, a count N >= 1, or distinct non-negative indices (`0,1`; `3`
    alone is a count, so one index is written `3,`)."""
    value = text.strip().lower()
    if value in ("all", "none"):
        return GpuRequest(kind=value)  # type: ignore[arg-type]  # narrowed by the test above
    if not value:
        raise UsageError(f"--gpus {text!r} is empty: {_ACCEPTED}")
    if "," not in value:
        if not value.isdigit():
            raise UsageError(f"--gpus {text!r}: {_ACCEPTED}")
        count = int(value)
        if count == 0:
            raise UsageError("--gpus 0 asks for no GPU: use `--gpus none` to run on the CPU",
                             hint=f"otherwise {_ACCEPTED}")
        return GpuRequest(kind="count", count=count)
    parts = [part.strip() for part in value.split(",")]
    if parts[-1] == "":          # `3,`: the single index 3
        parts = parts[:-1]
    if not parts or not all(part.isdigit() for part in parts):
        raise UsageError(f"--gpus {text!r}: {_ACCEPTED}")
    indices = tuple(int(part) for part in parts)
    if len(set(indices)) != len(indices):
        raise UsageError(f"--gpus {text!r} names a GPU twice: {_ACCEPTED}")
    return GpuRequest(kind="indices", indices=indices)


# ---------------------------------------------------------------------- facts


@dataclass(frozen=True)
class ImageGpuFacts:
    """What a method's environment was built for: read from its lock, and from torch at build time."""

    torch: str | None = None            # torch's version, local part dropped (2.13.0)
    cuda: str | None = None             # the CUDA runtime it ships or needs, major.minor (13.0)
    cudnn: str | None = None
    archs: tuple[str, ...] = ()         # torch.cuda.get_arch_list(): sm_75 ... sm_120, compute_120 (PTX)

    @property
    def uses_cuda(self) -> bool:
        return self.cuda is not None

    def min_driver(self) -> tuple[int, ...] | None:
        return min_driver(self.cuda) if self.cuda else None

    def describe(self) -> str:
        """`needs NVIDIA driver ≥ 580 (CUDA 13.0); GPUs sm_75–sm_120`, or what is known of it."""
        if not self.cuda:
            return "no CUDA (CPU only)" if self.torch else "no GPU stack"
        need = min_driver(self.cuda)
        full = full_driver(self.cuda)
        jit = f"; ≥ {_version_text(full)} for PTX JIT" if full and need and full[0] != need[0] else ""
        text = f"needs NVIDIA driver ≥ {_version_text(need)} (CUDA {self.cuda}{jit})" if need \
            else f"CUDA {self.cuda} (minimum driver unknown to envmgr)"
        sms = sorted((_arch_capability(a) for a in self.archs if a.startswith("sm_")), key=lambda c: c)
        if sms:
            text += f"; GPUs sm_{sms[0][0]}{sms[0][1]}–sm_{sms[-1][0]}{sms[-1][1]}"
        return text


    def to_labels(self) -> dict[str, str]:
        """Image labels (absent facts: no label)."""
        labels = {paths.LABEL_TORCH: self.torch, paths.LABEL_CUDA: self.cuda, paths.LABEL_CUDNN: self.cudnn,
                  paths.LABEL_GPU_ARCHS: ",".join(self.archs) or None}
        return {key: value for key, value in labels.items() if value}

    @classmethod
    def from_labels(cls, labels: dict[str, str] | None) -> "ImageGpuFacts":
        labels = labels or {}
        archs = labels.get(paths.LABEL_GPU_ARCHS, "")
        return cls(torch=labels.get(paths.LABEL_TORCH), cuda=labels.get(paths.LABEL_CUDA),
                   cudnn=labels.get(paths.LABEL_CUDNN), archs=tuple(a for a in archs.split(",") if a))


def facts_from_pins(pins: dict[str, str], virtual_packages: dict[str, str] | None = None) -> ImageGpuFacts:
    """GPU facts of a lock: torch's version; the CUDA runtime from `nvidia-cuda-runtime*` (PyPI),
    `cuda-version` or the `__cuda` virtual package (conda), or torch's `+cuXYZ` local version;
    cuDNN from `nvidia-cudnn-cu*` or conda's `cudnn`."""
    by_name = {name.lower().replace("_", "-"): version for name, version in pins.items()}
    torch_full = by_name.get("torch") or by_name.get("pytorch")
    torch, _, local = (torch_full or "").partition("+")
    cuda = None
    for name, version in sorted(by_name.items()):
        if name == "nvidia-cuda-runtime" or (name.startswith("nvidia-cuda-runtime-cu") and name[22:].isdigit()):
            cuda = version
    cuda = cuda or by_name.get("cuda-version") or by_name.get("cuda-cudart") or (virtual_packages or {}).get("__cuda")
    if not cuda and local.startswith("cu") and local[2:].isdigit() and len(local) >= 4:
        cuda = f"{local[2:-1]}.{local[-1]}"     # torch 2.10.0+cu128: CUDA 12.8
    cudnn = next((v for n, v in sorted(by_name.items()) if n.startswith("nvidia-cudnn-cu")), None) \
        or by_name.get("cudnn")
    if cuda:
        major, minor = _major_minor(cuda)
        cuda = f"{major}.{minor}"
    return ImageGpuFacts(torch=torch or None, cuda=cuda, cudnn=cudnn)


@dataclass(frozen=True)
class HostGpu:
    index: int                 # NVML's index: what `--gpus 0,1` and NVIDIA_VISIBLE_DEVICES name
    name: str
    capability: tuple[int, int]
    memory_bytes: int

    def describe(self) -> str:
        return f"{self.index}: {self.name} (sm_{self.capability[0]}{self.capability[1]}, " \
               f"{self.memory_bytes / 1e9:.0f} GB)"


@dataclass(frozen=True)
class HostGpuFacts:
    """The host's NVIDIA driver and GPUs; `problem` says why they could not be read."""

    driver: str | None = None          # 570.86.10
    cuda: str | None = None            # the newest CUDA the driver supports, major.minor
    gpus: tuple[HostGpu, ...] = ()
    source: str = "nvml"               # "nvml" or "probe container"
    problem: str | None = None

    def describe(self) -> str:
        if self.problem:
            return self.problem
        if not self.gpus:
            return f"driver {self.driver}: no GPUs"
        return f"driver {self.driver} (CUDA {self.cuda}), " + "; ".join(g.describe() for g in self.gpus)


# ---------------------------------------------------------------------- NVIDIA's compatibility table

# Minimum Linux driver per CUDA version, from NVIDIA's CUDA Toolkit Release Notes, "CUDA Driver":
# Table 2 (minor-version compatibility: a driver of the same major family runs newer 12.x/13.x
# runtimes, without PTX JIT) and Table 3 (each toolkit's own driver, full compatibility).
# https://docs.nvidia.com/cuda/cuda-toolkit-release-notes/index.html#cuda-driver
MINOR_VERSION_DRIVER: dict[int, tuple[int, ...]] = {
    11: (450, 80, 2),
    12: (525, 60, 13),
    13: (580, 65, 6),
}
TOOLKIT_DRIVER: dict[tuple[int, int], tuple[int, ...]] = {
    (11, 8): (520, 61, 5),
    (12, 0): (525, 60, 13), (12, 1): (530, 30, 2), (12, 2): (535, 54, 3), (12, 3): (545, 23, 6),
    (12, 4): (550, 54, 14), (12, 5): (555, 42, 2), (12, 6): (560, 28, 3), (12, 8): (570, 26),
    (12, 9): (575, 51, 3),
    (13, 0): (580, 65, 6),
}


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for part in text.strip().split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def _version_text(version: tuple[int, ...] | None) -> str:
    return str(version[0]) if version else "?"   # drivers are named by their branch: 525, 570, 580


def _major_minor(cuda: str) -> tuple[int, int]:
    parts = _version_tuple(cuda)
    return (parts[0], parts[1] if len(parts) > 1 else 0)


def min_driver(cuda: str) -> tuple[int, ...] | None:
    """The oldest driver that runs CUDA `cuda` at all (minor-version compatibility)."""
    return MINOR_VERSION_DRIVER.get(_major_minor(cuda)[0])


def full_driver(cuda: str) -> tuple[int, ...] | None:
    """The driver the CUDA `cuda` toolkit shipped with (PTX JIT and every feature work)."""
    return TOOLKIT_DRIVER.get(_major_minor(cuda))


def driver_runs(driver: str, cuda: str) -> bool:
    need = min_driver(cuda)
    return need is None or _version_tuple(driver) >= need


# ---------------------------------------------------------------------- architectures


def _arch_capability(arch: str) -> tuple[int, int]:
    digits = "".join(ch for ch in arch.split("_", 1)[1] if ch.isdigit())
    return (int(digits[:-1]), int(digits[-1]))


def arch_support(capability: tuple[int, int], archs: tuple[str, ...]) -> str | None:
    """How a GPU of `capability` runs this build: "sass" (compiled for it, or an earlier minor of
    its major: cubins run on later minors of the same major), "ptx" (JIT from a `compute_XY` no
    newer than the GPU), or None (no kernel image for it)."""
    for arch in archs:
        kind, _, rest = arch.partition("_")
        if not rest or not rest[0].isdigit():
            continue
        cap = _arch_capability(arch)
        specific = rest[-1] == "a"    # sm_90a: that exact GPU only
        if kind == "sm" and (cap == capability or (not specific and cap[0] == capability[0]
                                                   and cap[1] <= capability[1])):
            return "sass"
    for arch in archs:
        if arch.startswith("compute_") and arch[8:].isdigit() and _arch_capability(arch) <= capability:
            return "ptx"
    return None


# ---------------------------------------------------------------------- the decision


@dataclass(frozen=True)
class GpuCheck:
    """The answer for one image on one host: the GPUs it will use, or one line saying what is needed."""

    gpus: tuple[HostGpu, ...] = ()
    problem: str | None = None
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.problem is None


def _by_index(gpus: list[HostGpu] | tuple[HostGpu, ...]) -> str:
    """`--gpus` naming these GPUs (one index is written `3,`: `3` alone is a count)."""
    text = ",".join(str(g.index) for g in gpus)
    return text + "," if len(gpus) == 1 else text


def select_gpus(request: GpuRequest, host: HostGpuFacts) -> tuple[tuple[HostGpu, ...], str | None]:
    """The host GPUs a request names, or why it cannot have them."""
    have = host.gpus
    listing = ", ".join(g.describe() for g in have)
    if request.kind == "all":
        return have, None
    if request.kind == "count":
        assert request.count is not None
        if request.count > len(have):
            return (), (f"--gpus {request.count} asks for {request.count} GPUs but this host has {len(have)} "
                        f"({listing}): ask for at most {len(have)}, or name them, e.g. --gpus {_by_index(have)}")
        return have[: request.count], None
    by_index = {g.index: g for g in have}
    missing = [i for i in request.indices if i not in by_index]
    if missing:
        return (), (f"--gpus {request.env_value()}: this host has no GPU {', '.join(map(str, missing))} "
                    f"(it has {listing}): name GPUs 0–{len(have) - 1}")
    return tuple(by_index[i] for i in request.indices), None


def check(request: GpuRequest, image: ImageGpuFacts, host: HostGpuFacts, *,
          memory_gb: float | None = None) -> GpuCheck:
    """Whether `image` can use the GPUs `request` names on `host`: the first problem, with its fix,
    or the GPUs it will use. Nothing is checked for `--gpus none`: the CPU was chosen."""
    if not request.wants_gpus:
        return GpuCheck()
    if host.problem:
        return GpuCheck(problem=f"cannot read this host's GPUs: {host.problem}; install the NVIDIA driver "
                                "(NVML comes with it), or run on the CPU with --gpus none")
    if not host.gpus:
        return GpuCheck(problem=f"this host's NVIDIA driver {host.driver} reports no GPU: "
                                "run on the CPU with --gpus none")
    gpus, problem = select_gpus(request, host)
    if problem:
        return GpuCheck(problem=problem)
    names = sorted({g.name for g in gpus})
    if len(names) > 1:
        same = [g for g in gpus if g.name == gpus[0].name]
        return GpuCheck(problem=f"--gpus {request.env_value()} mixes GPU models ({', '.join(names)}): one "
                                f"training run needs one kind; choose them by index, e.g. --gpus {_by_index(same)}")
    notes: list[str] = []
    problem = (_driver_problem(image, host, notes) or _arch_problem(image, host, gpus, notes)
               or _memory_problem(host, gpus, memory_gb))
    return GpuCheck(problem=problem) if problem else GpuCheck(gpus=gpus, notes=tuple(notes))


def _driver_problem(image: ImageGpuFacts, host: HostGpuFacts, notes: list[str]) -> str | None:
    if not (image.cuda and host.driver):
        return None
    need = min_driver(image.cuda)
    if need and _version_tuple(host.driver) < need:
        return (f"this image needs NVIDIA driver ≥ {_version_text(need)} (CUDA {image.cuda}) but this host has "
                f"{host.driver} (CUDA {host.cuda or '?'}): upgrade the driver")
    full = full_driver(image.cuda)
    if full and _version_tuple(host.driver) < full:
        notes.append(f"driver {host.driver} runs CUDA {image.cuda} through minor-version compatibility "
                     f"(no PTX JIT; driver ≥ {'.'.join(map(str, full))} runs everything)")
    return None


def _arch_problem(image: ImageGpuFacts, host: HostGpuFacts, gpus: tuple[HostGpu, ...],
                  notes: list[str]) -> str | None:
    if not image.cuda:
        return None
    if not image.archs:
        notes.append("the image's GPU architectures are unknown: not checked")
        return None
    built = image.describe().split("; GPUs ")[-1]
    for gpu in gpus:
        how = arch_support(gpu.capability, image.archs)
        sm = f"sm_{gpu.capability[0]}{gpu.capability[1]}"
        if how is None:
            older = all(_arch_capability(a) > gpu.capability for a in image.archs if "_" in a)
            fix = ("a variant with an older torch that still ships it" if older
                   else "a variant with a newer torch/CUDA built for it")
            return (f"GPU {gpu.index} ({gpu.name}, {sm}) has no kernels in this image (torch {image.torch or '?'} "
                    f"is built for {built}): use {fix}")
        if how == "ptx":
            full = full_driver(image.cuda)
            if full and host.driver and _version_tuple(host.driver) < full:
                return (f"GPU {gpu.index} ({gpu.name}, {sm}) needs PTX JIT of this image's CUDA {image.cuda} "
                        f"kernels, which needs driver ≥ {'.'.join(map(str, full))} (this host has {host.driver}): "
                        "upgrade the driver")
            notes.append(f"GPU {gpu.index} ({sm}) runs JIT-compiled PTX: the first steps are slow")
    return None


def _memory_problem(host: HostGpuFacts, gpus: tuple[HostGpu, ...], memory_gb: float | None) -> str | None:
    if not memory_gb:
        return None
    small = [g for g in gpus if g.memory_bytes < memory_gb * 1e9]
    if not small:
        return None
    big = [g for g in host.gpus if g.memory_bytes >= memory_gb * 1e9]
    fix = (f"choose larger GPUs, e.g. --gpus {_by_index(big)}" if big
           else "use a server with larger GPUs")
    return (f"GPU {small[0].index} ({small[0].name}) has {small[0].memory_bytes / 1e9:.1f} GB; this method needs "
            f"{memory_gb:g} GB per GPU: {fix}")
