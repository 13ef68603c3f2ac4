"""GPUs: what `--gpus` asks for, what an image was built for, what the host has, and whether they fit.

This module decides; it never talks to the engine. `parse_gpus` is the one parser of `--gpus` for
every verb; host and image facts come in as plain dataclasses so the decisions can be tested with
real driver/CUDA/architecture values on a machine without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .errors import UsageError

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
