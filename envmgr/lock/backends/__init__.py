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

import importlib
from dataclasses import dataclass
from pathlib import Path

from envmgr.core.errors import UsageError
from envmgr.core.spec import MethodSpec
from envmgr.lock.backends.protocol import Backend

# kind -> (module, class), in the order detection prefers them when a repository has several environment
# files: the one table of kinds. Modules are imported on first use, and `get_backend` imports only the
# method's own (conda's pulls in rattler and asyncio, which a poetry method's `envmgr run` and each of its
# Slurm steps would otherwise pay for at start).
KINDS = {"poetry": ("poetry", "PoetryBackend"), "conda": ("conda", "CondaBackend"), "pip": ("pip", "PipBackend")}

_REGISTRY: dict[str, Backend] | None = None   # every kind, once detection asked for all of them
_LOADED: dict[str, Backend] = {}


def _load(kind: str) -> Backend:
    if kind not in _LOADED:
        module, name = KINDS[kind]
        _LOADED[kind] = getattr(importlib.import_module(f"{__name__}.{module}"), name)()
    return _LOADED[kind]


def registry() -> dict[str, Backend]:
    """Every backend by kind, in the order detection prefers them when a repository has several
    environment files. Built on first use: importing the backends' modules stays off the commands that
    never ask a backend anything."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = {kind: _load(kind) for kind in KINDS}
    return _REGISTRY


def get_backend(spec: MethodSpec) -> Backend:
    """The method's backend; only its own module is imported (unless the registry is already built)."""
    if _REGISTRY is not None:
        backends = _REGISTRY
    elif spec.backend in KINDS:
        return _load(spec.backend)
    else:
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
