"""Build hooks; everything declarative is in pyproject.toml.

The repository keeps its built-in methods (envs/) and base image definitions (images/) at the top level;
a wheel carries them inside the package, as envmgr/_builtin/{envs,images} (read by envmgr.core.paths.builtin_dir),
with the files' executable bits, since those are part of a method's inputs hash. The wheel also records
the commit it was built from (envmgr/_build.json, read by envmgr.core.version); an sdist carries that record so
a wheel built from it names the same commit.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = Path(__file__).resolve().parent
BUILTIN = ("envs", "images")
BUILD_INFO = "_build.json"
# Caches and virtualenvs (by name; the method layer leaves out the same junk) and bench outputs (by path):
# never package data.
JUNK = ("__pycache__", "*.pyc", ".pytest_cache", ".mypy_cache", ".ruff_cache", ".venv*", ".DS_Store", ".git")
BULKY = ("*/bench/results*",)


def _skipped(rel: str) -> bool:
    return any(fnmatch.fnmatch(rel.rsplit("/", 1)[-1], p) for p in JUNK) or any(fnmatch.fnmatch(rel, p) for p in BULKY)


def _builtin_files(root: Path):
    """(relative path, source) for every file of envs/ and images/ that is not junk."""
    for top in BUILTIN:
        for dirpath, dirnames, filenames in os.walk(root / top):
            rel_dir = Path(dirpath).relative_to(root).as_posix()
            dirnames[:] = sorted(d for d in dirnames if not _skipped(f"{rel_dir}/{d}"))
            for name in sorted(filenames):
                if not _skipped(f"{rel_dir}/{name}"):
                    yield f"{rel_dir}/{name}", Path(dirpath, name)


def _build_info(root: Path) -> dict:
    """The commit of the checkout being built; in an unpacked sdist, the record the sdist carries."""
    if (root / ".git").exists():     # a checkout (a worktree's .git is a file), not an sdist inside another repo
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                    check=True).stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                   capture_output=True, text=True, check=True).stdout.strip() != ""
            return {"commit": commit, "dirty": dirty}
        except (OSError, subprocess.CalledProcessError):
            pass
    recorded = root / "envmgr" / BUILD_INFO
    if recorded.is_file():
        return json.loads(recorded.read_text())
    return {"commit": None, "dirty": False}


class BuildPy(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return      # an editable install reads envs/ and images/ from the checkout itself
        package = Path(self.build_lib) / "envmgr"
        target = package / "_builtin"
        if target.exists():
            shutil.rmtree(target)
        for rel, source in _builtin_files(HERE):
            dest = target / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, dest)
            dest.chmod(0o755 if source.stat().st_mode & 0o111 else 0o644)
        (package / BUILD_INFO).write_text(json.dumps(_build_info(HERE), sort_keys=True) + "\n")


class Sdist(sdist):
    def make_release_tree(self, base_dir, files) -> None:
        super().make_release_tree(base_dir, files)
        record = Path(base_dir) / "envmgr" / BUILD_INFO
        record.unlink(missing_ok=True)      # a hard link to a checkout's file must not be written through
        record.write_text(json.dumps(_build_info(HERE), sort_keys=True) + "\n")


setup(cmdclass={"build_py": BuildPy, "sdist": Sdist})
