"""The questions every backend answers (`Backend`) and what detection returns (`Evidence`).

Apart from the registry (the package's `__init__`), so that a backend module imports the protocol and the
registry imports the backends, never round a loop."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

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
