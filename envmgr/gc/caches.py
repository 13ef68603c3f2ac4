"""The caches under cache_dir (and the store): what each holds, how big it is, and what `gc` trims.

The rule (README, "Caches"): a download cache — uv's, poetry's, rattler's conda packages — keeps the
files of the package versions a current lock names (any method this base dir knows, every variant), so a
rebuild or a re-lock does not fetch them again; the other versions go. uv's unpacked wheels
(`archive-v0/`) go once no entry points at them. Base rootfs tars and lock tools: the current ones
stay, superseded ones go. Index caches and memos (uv's `simple-*`, poetry's `cache/`, conda repodata,
the apt Contents reductions, the system-library scans, content hashes) stay. `--all` empties the
download caches, index caches and memos as well; the current base and lock tools still stay (they are
rebuilt, not downloaded). Layers, SBOMs and signatures follow the images (envmgr/gc/gc.py). Nothing is
trimmed while a build or a lock step is running.
"""

from __future__ import annotations

import fcntl
import os
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from envmgr.door.context import Context
from envmgr.gc.disk import tree_bytes

# top-level entries of cache_dir, in the order doctor shows them: name -> what it holds
KNOWN = {
    "uv": "uv's downloads and unpacked wheels (locks, builds)",
    "poetry": "poetry's downloads and index metadata (locks)",
    "conda": "conda packages and repodata (locks, builds)",
    "layers": "environment, method and system layers (follow the images)",
    "store": "layer store, base rootfs and lock tools",
    "sbom": "SBOMs of built images (follow the images)",
    "signatures": "signature records (follow the images)",
    "apt-contents": "library files of the apt mirror's Contents index",
    "system-libs": "system libraries each environment needs",
    "work": "build scratch (interrupted builds leave it)",
    "envs": "build stages (interrupted builds leave them)",
}
MEMOS = ("apt-contents", "system-libs", "content-hashes.json")
_POETRY_LOCK = re.compile(r'^\[\[package\]\]\s*\nname = "([^"]+)"\s*\nversion = "([^"]+)"', re.M)
_PINNED = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", re.M)
_YAML_ENTRY = re.compile(r"^\s*-?\s*name: ['\"]?([^\s'\"]+)['\"]?\s*\n\s+version: ['\"]?([^\s'\"]+)", re.M)
_ARCHIVE_ID = re.compile(rb"[A-Za-z0-9_-]{16,}")


@dataclass
class CacheUse:
    name: str
    path: str
    bytes: int
    holds: str

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Trim:
    """One cache's share of a gc: the paths to remove and what they free."""

    cache: str
    why: str
    paths: list[Path] = field(default_factory=list)
    bytes: int = 0

    def add(self, path: Path) -> None:
        self.paths.append(path)
        self.bytes += _bytes(path)


def _bytes(path: Path) -> int:
    if path.is_symlink() or not path.is_dir():
        try:
            return path.lstat().st_size
        except OSError:
            return 0
    return tree_bytes(path)


def usage(ctx: Context) -> list[CacheUse]:
    """Each cache's size: the known folders first, the store's parts, then anything else found there."""
    cache, store = ctx.cache_dir, ctx.store_dir
    found: list[CacheUse] = []
    entries = sorted(p.name for p in cache.iterdir()) if cache.is_dir() else []
    for name in [*KNOWN, *(e for e in entries if e not in KNOWN)]:
        path = cache / name
        if not path.exists() or name.endswith(".lock") or (name == "store" and store == path):
            continue
        found.append(CacheUse(name, str(path), _bytes(path), KNOWN.get(name, "")))
    for part, holds in (("layers", "layer store (follows the images)"), ("base", "base image rootfs"),
                        ("tools", "lock tools (poetry)")):
        path = store / part
        if path.exists():
            found.append(CacheUse(f"store/{part}", str(path), _bytes(path), holds))
    return found


# ---------------------------------------------------------------------- what current locks name


def normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_versions(lock_texts: Iterable[str]) -> set[tuple[str, str]]:
    """(normalized name, version) of every package a lock names: poetry.lock, a hashed requirements file,
    conda-lock.yml (its conda and pip entries)."""
    found: set[tuple[str, str]] = set()
    for text in lock_texts:
        for pattern in (_POETRY_LOCK, _PINNED, _YAML_ENTRY):
            found.update((normal(name), version) for name, version in pattern.findall(text))
    return found


def current_lock_texts(ctx: Context) -> list[str]:
    from envmgr.core.spec import list_methods
    from envmgr.core.variants import all_variants
    from envmgr.lock.backends import get_backend

    texts = []
    for method in list_methods(ctx.config.base_dir):
        for spec in all_variants(method):
            for path in get_backend(spec).lock_files(spec):
                if path.is_file():
                    texts.append(path.read_text(errors="replace"))
    return texts


# ---------------------------------------------------------------------- the trims


def plan(ctx: Context, everything: bool = False) -> list[Trim]:
    """What gc removes from the caches (see the module's rule)."""
    cache = ctx.cache_dir
    if everything:
        trims = [_whole(cache / name, name) for name in ("uv", "poetry", "conda", *MEMOS)]
    else:
        locked = locked_versions(current_lock_texts(ctx))
        trims = [_uv(cache / "uv", locked), _poetry(cache / "poetry", locked), _conda(cache / "conda" / "pkgs", locked)]
    trims += _store(ctx)
    return [t for t in trims if t.paths]


def _whole(path: Path, name: str) -> Trim:
    trim = Trim(name, "all of it (--all)")
    if path.is_dir() and not path.is_symlink():
        for child in sorted(path.iterdir()):
            trim.add(child)
    elif path.is_file():
        trim.add(path)
    return trim


def _version_of(entry: str) -> str:
    """`4.16.0-py3-none-any(.http)` -> `4.16.0` (a normalized version has no '-')."""
    return entry.split("-", 1)[0].removesuffix(".http").removesuffix(".msgpack").removesuffix(".lock")


def _uv(root: Path, locked: set[tuple[str, str]]) -> Trim:
    trim = Trim("uv", "package versions no current lock names, and unpacked wheels nothing points at")
    if not root.is_dir() or root.is_symlink():
        return trim
    kept_pointers: list[Path] = []
    for bucket in sorted(root.glob("wheels-v*")) + sorted(root.glob("sdists-v*")):
        for index in sorted(_dirs(bucket)):
            packages = (_dirs(index) if index.name == "pypi"
                        else [p for h in _dirs(index) for p in _dirs(h)] if index.name == "index"
                        else [])
            if not packages:          # url, path, git: built from a source a lock names by URL: kept
                kept_pointers.append(index)
            for package in sorted(packages):
                for entry in sorted(package.iterdir()):
                    if (normal(package.name), _version_of(entry.name)) in locked:
                        kept_pointers.append(entry)
                    else:
                        trim.add(entry)
    others = [p for p in root.iterdir() if not p.name.startswith(("archive-v", "wheels-v", "sdists-v"))]
    referenced = _referenced_archives(kept_pointers + others)
    for archive in sorted(root.glob("archive-v*/*")):
        if archive.name not in referenced:
            trim.add(archive)
    return trim


def _dirs(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_dir() and not p.is_symlink()]


def _referenced_archives(roots: list[Path]) -> set[str]:
    """Archive IDs named by a link or a small pointer file (.http, .msgpack) under `roots`."""
    found: set[str] = set()
    for top in roots:
        for path in [top, *top.rglob("*")] if top.is_dir() and not top.is_symlink() else [top]:
            if path.is_symlink():
                found.add(Path(os.readlink(path)).name)
            elif path.suffix in (".http", ".msgpack") and path.is_file() and path.stat().st_size < 1 << 20:
                found.update(m.decode() for m in _ARCHIVE_ID.findall(path.read_bytes()))
    return found


def _poetry(root: Path, locked: set[tuple[str, str]]) -> Trim:
    """poetry's `artifacts/<h>/<h>/<h>/<h>/<file>`: a wheel or sdist file name says its name and version."""
    trim = Trim("poetry", "downloaded files of package versions no current lock names")
    for path in sorted((root / "artifacts").glob("*/*/*/*/*")) if (root / "artifacts").is_dir() else []:
        name_version = _dist_file(path.name)
        if name_version is None or name_version not in locked:
            trim.add(path)
    return trim


def _dist_file(filename: str) -> tuple[str, str] | None:
    if filename.endswith(".whl"):
        parts = filename.split("-")
        return (normal(parts[0]), parts[1]) if len(parts) >= 5 else None
    for suffix in (".tar.gz", ".zip", ".tar.bz2"):
        if filename.endswith(suffix):
            name, _, version = filename[:-len(suffix)].rpartition("-")
            return (normal(name), version) if name else None
    return None


def _conda(root: Path, locked: set[tuple[str, str]]) -> Trim:
    """rattler's package cache: `<name>-<version>-<build>` folders (and their archives)."""
    trim = Trim("conda", "packages no current lock names")
    for path in sorted(root.iterdir()) if root.is_dir() and not root.is_symlink() else []:
        stem = path.name.removesuffix(".conda").removesuffix(".tar.bz2")
        name, version, build = (stem.rsplit("-", 2) + ["", "", ""])[:3]
        if build and (normal(name), version) not in locked:
            trim.add(path)
    return trim


def _store(ctx: Context) -> list[Trim]:
    """Superseded base rootfs tars (not the one `current.json` names) and lock tools of other versions."""
    import json

    from envmgr.lock.backends.poetry import POETRY_VERSION, PYPI_MIRROR_PLUGIN_VERSION

    bases = Trim("store/base", "superseded base rootfs")
    current_diffs: set[str] = set()
    for folder in sorted((ctx.store_dir / "base").iterdir()) if (ctx.store_dir / "base").is_dir() else []:
        try:
            current = json.loads((folder / "current.json").read_text())
        except (OSError, ValueError):
            continue        # being built, or not envmgr's: left alone
        current_diffs.add(str(current.get("diff_id", "")).split(":")[-1][:12])
        for tar in sorted(folder.glob("*.tar")):
            if tar.name != Path(str(current.get("layer_path", ""))).name:
                bases.add(tar)
    tools = Trim("store/tools", "lock tools of another poetry version or base")
    wanted = f"poetry-{POETRY_VERSION}-mirror-{PYPI_MIRROR_PLUGIN_VERSION}-"
    for path in sorted((ctx.store_dir / "tools").iterdir()) if (ctx.store_dir / "tools").is_dir() else []:
        name = path.name.removesuffix(".lock")
        if name.startswith("poetry-") and not (name.startswith(wanted) and name[len(wanted):] in current_diffs):
            tools.add(path)
    return [bases, tools]


@contextmanager
def held(cache_dir: Path) -> Iterator[bool]:
    """The uv cache's lock, exclusive, if no step holds it now (True); the trims run inside it."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(cache_dir / "uv.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def busy(ctx: Context) -> str | None:
    """Why the caches cannot be trimmed now (a build, or a step holding the uv cache), or None."""
    from envmgr.build.target import build_running

    if build_running(ctx.cache_dir):
        return "a build is running"
    lock = ctx.cache_dir / "uv.lock"
    if lock.is_file():
        with open(lock, "a") as guard:
            try:
                fcntl.flock(guard, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(guard, fcntl.LOCK_UN)
            except BlockingIOError:
                return "a lock or build step is using the uv cache"
    return None
