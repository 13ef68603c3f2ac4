"""Environment backends: one module per kind of environment, each answering the same few questions.

A backend knows which files are its lock, how to lock (inside a container of the method's base
image, through the site's mirrors), whether a lock is current, and how to install a lock into an
environment prefix. Nothing else in envmgr asks which backend a method uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from ..base import BaseImage
from ..context import Context
from ..errors import UsageError
from ..spec import MethodSpec


class Backend(Protocol):
    name: str

    def lock_files(self, spec: MethodSpec) -> list[Path]:
        """The files a lock consists of (their bytes go into the image's inputs hash)."""

    def lock(self, ctx: Context, spec: MethodSpec, base: BaseImage, regenerate: bool = False) -> list[Path]:
        """Solve for the target platform through the site's mirrors; write mirror-free lock files."""

    def check(self, spec: MethodSpec) -> None:
        """Raise StaleLockError when a lock is missing or no longer matches its inputs."""

    def install(self, ctx: Context, spec: MethodSpec, base: BaseImage, prefix: Path) -> None:
        """Install the lock into `prefix` (a host folder that becomes the image's env prefix)."""

    def summary(self, spec: MethodSpec) -> dict:
        """What `envmgr show` prints about the locked environment."""

    # Optional: `entry_prefix(spec) -> list[str]`, the command that activates the environment before
    # the method's entry runs (conda: `conda run -n <m>`, which sources etc/conda/activate.d).


def entry_command(spec: MethodSpec, command: list[str]) -> list[str]:
    """`command` started the way the method's environment must be activated (the image's CMD, `envmgr run`)."""
    activate = getattr(get_backend(spec), "entry_prefix", None)
    return [*activate(spec), *command] if activate else list(command)


# backend name -> its module and class: only the method's own backend is imported (conda's pulls in rattler and
# asyncio, which a poetry method's `envmgr run` and each of its Slurm steps would otherwise pay for at start)
BACKENDS = {"poetry": ("poetry", "PoetryBackend"), "pip": ("pip", "PipBackend"), "conda": ("conda", "CondaBackend")}


def get_backend(spec: MethodSpec) -> Backend:
    import importlib

    try:
        module, name = BACKENDS[spec.backend]
    except KeyError:
        raise UsageError(f"{spec.folder / 'envmgr.toml'}: key 'backend': unknown backend {spec.backend!r} "
                         f"(known: {', '.join(sorted(BACKENDS))})") from None
    backend: Backend = getattr(importlib.import_module(f".{module}", __name__), name)()
    return backend
