"""The host's NVIDIA driver and GPUs: the one place that reads them.

Through NVML (NVIDIA's own library, shipped with every driver, via the `nvidia-ml-py` bindings)
on the host; where the host has no NVML (envmgr in a container, driver libraries only in the
engine's runtime), through `nvidia-smi` in a throw-away container given every GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from envmgr.core.gpu import HostGpu, HostGpuFacts

# nvidia-smi's CSV query, in a probe container (the toolkit mounts nvidia-smi into it)
PROBE_QUERY = "index,name,compute_cap,memory.total,driver_version"
PROBE_SCRIPT = (f"nvidia-smi --query-gpu={PROBE_QUERY} --format=csv,noheader,nounits && "
                "nvidia-smi | grep -o 'CUDA Version: [0-9.]*' || true")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def read_nvml(nvml: Any = None) -> HostGpuFacts:
    """Facts through NVML; `problem` says why not (no library, no driver loaded, a failing call)."""
    if nvml is None:
        try:
            import pynvml
        except ImportError:
            return HostGpuFacts(problem="the nvidia-ml-py package is missing from envmgr's environment")
        nvml = pynvml
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        return HostGpuFacts(problem=f"NVML is not usable on this host ({exc})")
    try:
        driver = _text(nvml.nvmlSystemGetDriverVersion())
        cuda_int = int(nvml.nvmlSystemGetCudaDriverVersion())     # e.g. 12080
        gpus = []
        for index in range(int(nvml.nvmlDeviceGetCount())):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
            gpus.append(HostGpu(index=index, name=_text(nvml.nvmlDeviceGetName(handle)),
                                capability=(int(major), int(minor)),
                                memory_bytes=int(nvml.nvmlDeviceGetMemoryInfo(handle).total)))
        return HostGpuFacts(driver=driver, cuda=f"{cuda_int // 1000}.{cuda_int % 1000 // 10}", gpus=tuple(gpus))
    except nvml.NVMLError as exc:
        return HostGpuFacts(problem=f"NVML failed while reading the GPUs ({exc})")
    finally:
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()


def parse_probe(lines: list[str]) -> HostGpuFacts:
    """Facts from the probe container's nvidia-smi output (see PROBE_SCRIPT)."""
    gpus, driver, cuda = [], None, None
    for line in lines:
        line = line.strip()
        if line.startswith("CUDA Version:"):
            cuda = line.split(":", 1)[1].strip()
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 5 or not fields[0].isdigit():
            continue
        index, name, cap, memory_mib, driver = fields
        try:
            major, minor = (int(p) for p in cap.split("."))
            gpus.append(HostGpu(index=int(index), name=name, capability=(major, minor),
                                memory_bytes=int(float(memory_mib)) * (1 << 20)))
        except ValueError:
            continue
    if not gpus and not driver:
        shown = " | ".join(line.strip() for line in lines if line.strip())[-200:]
        return HostGpuFacts(source="probe container",
                            problem=f"nvidia-smi in a GPU container gave no GPUs ({shown or 'no output'})")
    return HostGpuFacts(driver=driver, cuda=cuda, gpus=tuple(gpus), source="probe container")


def read(probe: Callable[[], list[str]] | None = None, nvml: Any = None) -> HostGpuFacts:
    """NVML first; then, when NVML is not usable and a probe is given, a GPU container's nvidia-smi."""
    facts = read_nvml(nvml)
    if facts.problem is None or probe is None:
        return facts
    try:
        probed = parse_probe(probe())
    except Exception as exc:  # noqa: BLE001 - an engine error is reported beside NVML's, as one line
        text = getattr(exc, "message", None) or str(exc)
        return HostGpuFacts(problem=f"{facts.problem}; the probe container failed too ({text})")
    if probed.problem:
        return HostGpuFacts(source="probe container", problem=f"{facts.problem}; {probed.problem}")
    return probed

