"""Environment backends: one module per kind of environment, each answering the same questions.

A backend knows which repository files make a method its kind (detection), which files are its lock,
how to lock (inside a container of the method's base image, through the site's mirrors), whether a lock
is current, how to install a lock into an environment prefix, how the environment is cut into layers,
how its entry is started, what its lock changed against the repository's own pins, and what its lock
tells an SBOM. Every question is in `Backend`; a backend that has no answer says so explicitly (None,
an empty list), so nothing in envmgr probes a backend for what it supports. `registry()` maps each kind
to its backend: a new kind is one module here and one entry there. Nothing else in envmgr asks which
backend a method uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from envmgr.core.errors import UsageError
from envmgr.core.spec import MethodSpec
from envmgr.door.context import Context
from envmgr.images.base import BaseImage


@dataclass(frozen=True)
class Evidence:
    """Why a repository looks like a backend's kind: the files that say so, as `envmgr method add` prints
    them. Weak evidence (a project whose build backend names its dependencies) counts only when no backend
    found strong evidence."""

    reason: str
    weak: bool = False


class Backend(Protocol):
    name: str           # the kind: the spec's `backend` key, `--backend`
    env_file: str       # the file a repository needs to be this kind (named when `--backend` finds none)
    layered: bool       # the environment is one layer per distribution (layer_entries), else one layer

    # ------------------------------------------------------------------ detection (`envmgr method add`)

    def detect(self, root: Path, pyproject: dict) -> Evidence | None:
        """The repository at `root` (its parsed pyproject.toml, {} without one) as this kind, or None."""

    def refuse_over(self, root: Path, pyproject: dict, others: list[str]) -> None:
        """Raise UsageError when choosing this kind over the `others` also detected would silently drop
        what their files ask for (the user is then asked to choose with --backend)."""

    # ------------------------------------------------------------------ locking

    def lock_files(self, spec: MethodSpec) -> list[Path]:
        """The files a lock consists of (their bytes go into the image's inputs hash)."""

    def lock(self, ctx: Context, spec: MethodSpec, base: BaseImage, regenerate: bool = False) -> list[Path]:
        """Solve for the target platform through the site's mirrors; write mirror-free lock files."""

    def check(self, spec: MethodSpec) -> None:
        """Raise StaleLockError when a lock is missing or no longer matches its inputs."""

    def drift(self, spec: MethodSpec) -> list[dict[str, str | None]] | None:
        """What envmgr's lock moved against the repository's own lock or pins ({"package", "theirs", "ours"});
        None: the method has none of its own (or no lock yet), or the kind does not compare."""

    def seeded_from(self, spec: MethodSpec) -> str | None:
        """The repository's pins file the lock started from; None: none (or the kind does not seed)."""

    def summary(self, spec: MethodSpec) -> dict:
        """What `envmgr show` prints about the locked environment."""

    # ------------------------------------------------------------------ building and running

    def install(self, ctx: Context, spec: MethodSpec, base: BaseImage, prefix: Path) -> None:
        """Install the lock into `prefix` (a host folder that becomes the image's env prefix)."""

    def layer_entries(self, ctx: Context, spec: MethodSpec, base: BaseImage) -> tuple[list[str], list[str]] | None:
        """(one hashed requirement per distribution, mirrors of declared indexes): what build installs unit
        by unit into layers of their own. None when `layered` is false: `install` makes the one layer."""

    def entry_prefix(self, spec: MethodSpec) -> list[str]:
        """The command that activates the environment before the method's entry runs ([]: none needed)."""

    def lock_file_hashes(self, spec: MethodSpec) -> dict[str, list[str]]:
        """For the SBOM: normalized distribution name -> sha256 of every file the lock allows for it ({}:
        the lock records none an SBOM reads)."""


_REGISTRY: dict[str, Backend] | None = None


def registry() -> dict[str, Backend]:
    """Every backend by kind, in the order detection prefers them when a repository has several
    environment files. Built on first use: importing the backends' modules stays off the commands that
    never ask a backend anything."""
    global _REGISTRY
    if _REGISTRY is None:
        from envmgr.lock.backends.conda import CondaBackend
        from envmgr.lock.backends.pip import PipBackend
        from envmgr.lock.backends.poetry import PoetryBackend

        _REGISTRY = {backend.name: backend for backend in (PoetryBackend(), CondaBackend(), PipBackend())}
    return _REGISTRY


def get_backend(spec: MethodSpec) -> Backend:
    backends = registry()
    try:
        return backends[spec.backend]
    except KeyError:
        raise UsageError(f"{spec.folder / 'envmgr.toml'}: key 'backend': unknown backend {spec.backend!r} "
                         f"(known: {', '.join(sorted(backends))})") from None


def entry_command(spec: MethodSpec, command: list[str]) -> list[str]:
    """`command` started the way the method's environment must be activated (the image's CMD, `envmgr run`)."""
    return [*get_backend(spec).entry_prefix(spec), *command]


@dataclass
class Detected:
    backend: str
    reason: str
    note: str | None = None


def _evidence(root: Path, pyproject: dict) -> dict[str, str]:
    """kind -> reason for every backend the repository looks like (weak evidence only when there is no other),
    in the registry's order of preference."""
    found = {kind: evidence for kind, backend in registry().items()
             if (evidence := backend.detect(root, pyproject)) is not None}
    strong = {kind: evidence.reason for kind, evidence in found.items() if not evidence.weak}
    return strong or {kind: evidence.reason for kind, evidence in found.items()}


def detect(root: Path, pyproject: dict, choice: str | None) -> Detected:
    """The backend a repository's environment files make (`choice`: the user's --backend)."""
    found = _evidence(root, pyproject)
    if choice:
        if choice not in found:
            known = registry().get(choice)
            raise UsageError(f"--backend {choice}: the repository has no {known.env_file if known else choice}")
        return Detected(choice, found[choice])
    if not found:
        *files, last = [backend.env_file for backend in registry().values()]
        raise UsageError(f"{root}: no environment file found ({', '.join(files)} or {last})",
                         hint="add one to the repository, then `envmgr method add` again")
    winner, *others = found
    if others:
        registry()[winner].refuse_over(root, pyproject, others)
        note = f"found {', '.join(found.values())}; using {found[winner]} ({winner})"
        return Detected(winner, found[winner], note + " (choose another with --backend)")
    return Detected(winner, found[winner])
