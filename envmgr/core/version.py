"""What `envmgr --version` says: the version and the commit this envmgr was built from.

A wheel records its commit at build time (setup.py writes envmgr/_build.json); a checkout asks git.
"""

from __future__ import annotations

import json
import subprocess

from envmgr import __version__
from envmgr.core import paths

BUILD_INFO = paths.PACKAGE_DIR / "_build.json"


def commit() -> str | None:
    """The commit (12 hex digits, '+modified' when built from or running in a changed tree), or None."""
    info: dict = {}
    root = paths._checkout_root()
    if root is not None and (root / ".git").exists():
        info = _git(root)
    if not info.get("commit") and BUILD_INFO.is_file():
        try:
            info = json.loads(BUILD_INFO.read_text())
        except (OSError, ValueError):
            info = {}
    if not info.get("commit"):
        return None
    return info["commit"][:12] + ("+modified" if info.get("dirty") else "")


def _git(root) -> dict:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip() != ""
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"commit": head, "dirty": dirty}


def describe() -> str:
    """e.g. 'envmgr 0.1.0 (commit 0123456789ab)'."""
    found = commit()
    return f"envmgr {__version__} (commit {found or 'unknown'})"
