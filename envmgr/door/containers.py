"""What to run in a container, as plain values: the engine runs them, nothing here talks to it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from envmgr.core.gpu import GpuRequest, parse_gpus


@dataclass
class BindMount:
    source: Path
    target: str
    read_only: bool = True


@dataclass(frozen=True)
class GpuDevices:
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
    device_requests: list[GpuDevices] = field(default_factory=list)
    name: str | None = None
    stop_timeout: int = 30
    # least privilege (run and step containers): see `hardened()`
    cap_drop: list[str] = field(default_factory=list)
    cap_add: list[str] = field(default_factory=list)
    security_opt: list[str] = field(default_factory=list)
    read_only: bool = False
    tmpfs: dict[str, str] = field(default_factory=dict)
    pids_limit: int | None = None
    mem_limit: str | None = None

    def hardened(self, *, read_only: bool = True, pids_limit: int = 4096, mem_limit: str | None = None,
                 cap_add: list[str] | None = None, tmp_size: str | None = None) -> ContainerSpec:
        """No capabilities (but those named), no privilege gain, a read-only root with tmpfs /tmp (of at most
        `tmp_size`: the engine's default is half the host's RAM)."""
        self.cap_drop = ["ALL"]
        self.cap_add = list(cap_add or [])
        self.security_opt = ["no-new-privileges"]
        self.read_only = read_only
        if read_only:
            size = f",size={tmp_size}" if tmp_size else ""
            self.tmpfs = {"/tmp": f"rw,nosuid,nodev,exec,mode=1777{size}", **self.tmpfs}
        self.pids_limit = pids_limit
        self.mem_limit = mem_limit
        return self


@dataclass(frozen=True)
class ContainerResult:
    """How a container ended: its exit code, and whether the kernel killed it for lack of memory."""

    exit_code: int
    oom_killed: bool = False


def gpu_devices(request: GpuRequest | str) -> list[GpuDevices]:
    """What `--gpus` asked for (see gpu.parse_gpus) -> the GPUs a container gets."""
    if isinstance(request, str):
        request = parse_gpus(request)
    if request.kind == "none":
        return []
    if request.kind == "all":
        return [GpuDevices(count=-1)]
    if request.kind == "count":
        return [GpuDevices(count=request.count)]
    return [GpuDevices(device_ids=tuple(str(i) for i in request.indices))]
