"""`envmgr --version`: the package version, and the git commit of the checkout envmgr runs from.

The commit is read from the checkout at run time (`make install` installs envmgr editable, so the
code that runs is the checkout's); outside a checkout, or without git, the version alone."""

from __future__ import annotations

import subprocess
from pathlib import Path

from . import __version__


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def describe(root: Path | None = None) -> str:
    """`0.1.0 (git 1a2b3c4d5e6f)`, `… (git 1a2b3c4d5e6f, modified)` when tracked files differ from that
    commit, or `0.1.0` when envmgr does not run from a git checkout."""
    root = root or Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():   # a folder (clone) or a file (worktree); anything else: not a checkout
        return __version__
    commit = _git(root, "rev-parse", "--short=12", "HEAD")
    if not commit:
        return __version__
    changed = _git(root, "status", "--porcelain", "--untracked-files=no")
    return f"{__version__} (git {commit}{', modified' if changed else ''})"
