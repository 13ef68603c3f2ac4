"""What to run in a container, as plain values: the engine runs them, nothing here talks to it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .errors import UsageError


@dataclass
class BindMount:
    source: Path
    target: str
    read_only: bool = True


@dataclass(frozen=True)
class GpuRequest:
    """GPUs for a container: `count` of them (-1: all) or the devices `device_ids` name."""

    count: int | None = None
    device_ids: tuple[str, ...] = ()


@dataclass
class ContainerSpec:
    image: str
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    mounts: list[BindMount] = field(default_factory=list)
    workdir: str | None = None
    user: str | None = None
    network: str | None = "none"
    labels: dict[str, str] = field(default_factory=dict)
    shm_size: str | None = None
    device_requests: list[GpuRequest] = field(default_factory=list)
    name: str | None = None
    stop_timeout: int = 30


@dataclass(frozen=True)
class ContainerResult:
    """How a container ended: its exit code, and whether the kernel killed it for lack of memory."""

    exit_code: int
    oom_killed: bool = False


def gpu_requests(gpus: str) -> list[GpuRequest]:
    """`all`, `none`, a count (`2`) or a list of indices (`0,1`) -> GPU requests for the engine."""
    gpus = gpus.strip().lower()
    if gpus in ("none", "0", ""):
        return []
    if gpus == "all":
        return [GpuRequest(count=-1)]
    if gpus.isdigit():
        return [GpuRequest(count=int(gpus))]
    ids = [part.strip() for part in gpus.split(",")]
    if all(ids):
        return [GpuRequest(device_ids=tuple(ids))]
    raise UsageError(f"--gpus {gpus!r}: expected all, none, a count such as 2, or indices such as 0,1")
