"""`<cache>/uv`: the uv cache every uv step shares, lent whole to the layered install for hard links.

uv hard-links a wheel's files from its cache only when the cache and the environment are on one
mount; a container sees each bind mount as a mount of its own (link() across two fails with EXDEV,
even on one filesystem). So the layered install step (layers.stage_units) moves the cache into its
stage folder (a rename: same filesystem, checked), mounts the stage alone, and moves the cache back
when the step ends. While it is lent no other step may see the cache: each step that mounts or runs
uv with it holds `<cache>/uv.lock` shared (`shared_uv_cache`), the lender holds it exclusive
(`lend_uv_cache`). A cache left in a stage by a killed build is moved back by the next user.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

LENT_NAME = ".uv-cache"     # the cache's name inside a stage folder while it is lent
LOCK_NAME = "uv.lock"
STAGES = "envs"             # <cache>/envs/<method>-units-XXXX: the stage folders (layers.build_env_layers)


def uv_cache_dir(cache_dir: Path) -> Path:
    return cache_dir / "uv"


def _is_empty(folder: Path) -> bool:
    try:
        return not any(os.scandir(folder))
    except FileNotFoundError:
        return True


def _orphans(cache_dir: Path) -> list[Path]:
    return [p for p in (cache_dir / STAGES).glob(f"*/{LENT_NAME}") if p.is_dir() and not p.is_symlink()]


def recover_lent_cache(cache_dir: Path) -> Path | None:
    """Move back a cache a killed build left in its stage, when `<cache>/uv` is missing or empty.

    Call it holding the lock exclusive. Returns the stage the cache came from, or None.
    """
    cache = uv_cache_dir(cache_dir)
    if not _is_empty(cache):
        return None
    orphans = _orphans(cache_dir)
    if not orphans:
        return None
    orphan = max(orphans, key=lambda p: p.stat().st_mtime_ns)   # several killed builds: the latest
    if cache.is_dir():
        cache.rmdir()
    os.rename(orphan, cache)
    return orphan.parent


@contextmanager
def _locked(cache_dir: Path, mode: int, on_wait: Callable[[], None] | None = None) -> Iterator[int]:
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(cache_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait:
                on_wait()
            fcntl.flock(fd, mode)
        yield fd
    finally:
        os.close(fd)   # releases the lock


@contextmanager
def shared_uv_cache(cache_dir: Path) -> Iterator[Path]:
    """Hold the uv cache for a step that uses it in place (locks, copying installs); yields its path.

    Shared: any number of such steps at once, none while the cache is lent.
    """
    cache = uv_cache_dir(cache_dir)
    with _locked(cache_dir, fcntl.LOCK_SH) as fd:
        if _is_empty(cache) and _orphans(cache_dir):   # no lender is active: a killed build left it there
            fcntl.flock(fd, fcntl.LOCK_EX)
            recover_lent_cache(cache_dir)
            fcntl.flock(fd, fcntl.LOCK_SH)
        cache.mkdir(parents=True, exist_ok=True)
        yield cache


@contextmanager
def lend_uv_cache(cache_dir: Path, stage: Path, on_wait: Callable[[], None] | None = None) -> Iterator[str | None]:
    """Move the uv cache into `stage` for one step; yields its name there, or None when it cannot move.

    It cannot move (None: the step mounts it on its own and uv copies) when it is a link or a mount
    point, or on another filesystem than the stage. The cache is moved back when the step ends,
    before the stage is removed, whatever happened in it.
    """
    cache = uv_cache_dir(cache_dir)
    lent = stage / LENT_NAME
    with _locked(cache_dir, fcntl.LOCK_EX, on_wait) as fd:
        recover_lent_cache(cache_dir)
        cache.mkdir(parents=True, exist_ok=True)
        movable = (not cache.is_symlink() and not os.path.ismount(cache)
                   and cache.stat().st_dev == stage.stat().st_dev)
        if movable:
            try:
                os.rename(cache, lent)
            except OSError:
                movable = False
        if not movable:
            fcntl.flock(fd, fcntl.LOCK_UN)   # the step takes the cache shared, as any other user
            yield None
            return
        try:
            yield LENT_NAME
        finally:
            _give_back(cache, lent)


def _give_back(cache: Path, lent: Path) -> None:
    try:
        os.rename(lent, cache)
    except OSError:
        # a uv run outside envmgr made a new cache meanwhile: ours, the complete one, takes its place
        os.rename(cache, lent.with_name(LENT_NAME + "-displaced"))
        os.rename(lent, cache)
