"""Paths inside trees a method could write: a run's `work/` and `output/`, its writable dataset copy, its
writable method copy. Every host-side decision about such a path goes through here.

The method owns those trees and may have left a symbolic link at any level (`work/dataset/<name> -> /`),
so nothing here follows one: each folder is opened on its own below a root envmgr owns (the run dir),
with `O_NOFOLLOW` and its parent's descriptor; the last component is opened as `O_PATH` and looked at
before anything is done to it; modes and owners are changed through that descriptor, never by name. A
bind-mount source cannot be handed to the engine as a descriptor, so it is checked right before the
container is made: reached without a link, and its real path is the path the engine gets.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from envmgr.core.errors import UsageError

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_PATH = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


class Refused(UsageError):
    """A path in a method-owned tree that envmgr will not use: a link, or not the kind of file it should be."""


def kind_of(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a folder"), (stat.S_ISREG, "a file"),
                       (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "a special file"


def _parts(relative: str | PurePosixPath) -> list[str]:
    rel = PurePosixPath(relative)
    parts = [p for p in rel.parts if p not in ("", ".")]
    if rel.is_absolute() or ".." in parts:
        raise Refused(f"{str(relative)!r} is not a path inside the run directory")
    return parts


def _open_child(parent_fd: int, name: str, shown: Path) -> int:
    """A folder below `parent_fd`, never through a link: a link or a file there is refused by name."""
    try:
        return os.open(name, _DIR, dir_fd=parent_fd)
    except OSError as exc:
        if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
            raise
        what = kind_of(os.stat(name, dir_fd=parent_fd, follow_symlinks=False).st_mode)
        raise Refused(f"{shown} is {what}, not a folder; envmgr will not use it",
                      hint="the method replaced part of its run directory; start a new run") from None


@contextlib.contextmanager
def folder(root: Path, relative: str | PurePosixPath = "") -> Iterator[int]:
    """A descriptor of the folder `root/relative`, reached without following a link below `root`."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)   # root is envmgr's own (the run dir)
    try:
        shown = root
        for part in _parts(relative):
            shown = shown / part
            child = _open_child(fd, part, shown)
            os.close(fd)
            fd = child
        yield fd
    finally:
        os.close(fd)


def lstat(root: Path, relative: str | PurePosixPath) -> os.stat_result | None:
    """What `root/relative` is (not following a link, at any level), or None when it is not there."""
    parts = _parts(relative)
    try:
        with folder(root, PurePosixPath(*parts[:-1]) if parts[:-1] else "") as fd:
            return os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def is_folder(root: Path, relative: str | PurePosixPath) -> bool:
    """`root/relative` is a real folder, reached without a link; a link on the way or there is refused."""
    found = lstat(root, relative)
    if found is None:
        return False
    if not stat.S_ISDIR(found.st_mode):
        raise Refused(f"{root / relative} is {kind_of(found.st_mode)}, not a folder; envmgr will not use it",
                      hint="the method replaced part of its run directory; start a new run")
    return True


def ensure_folder(root: Path, relative: str | PurePosixPath, owner: tuple[int, int] | None = None) -> Path:
    """`root/relative` as a real folder (made when missing, never through a link), owned by `owner` if given."""
    parts = _parts(relative)
    with folder(root, PurePosixPath(*parts[:-1]) if parts[:-1] else "") as parent:
        with contextlib.suppress(FileExistsError):
            os.mkdir(parts[-1], 0o755, dir_fd=parent)
        fd = _open_child(parent, parts[-1], root.joinpath(*parts))
        try:
            if owner is not None and os.getuid() == 0 and owner != (0, 0):
                os.fchown(fd, *owner)
        finally:
            os.close(fd)
    return root.joinpath(*parts)


def mount_source(root: Path, relative: str | PurePosixPath) -> Path:
    """`root/relative` as a bind-mount source the engine may follow: every component below `root` a real
    folder (no link anywhere), and its real path the very path the engine is given."""
    parts = _parts(relative)
    path = Path(os.path.realpath(root)).joinpath(*parts)
    with folder(root, PurePosixPath(*parts) if parts else "") as fd:
        held = os.fstat(fd)
        try:
            named = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            named = None
        if os.path.realpath(path) != str(path) or named is None or (named.st_dev, named.st_ino) != (
                held.st_dev, held.st_ino):
            raise Refused(f"{path} changed while envmgr checked it (a link on its way?); envmgr will not mount it",
                          hint="the method replaced part of its run directory; start a new run")
    return path


@dataclass(frozen=True)
class Entry:
    """One thing found below a walked folder: its path relative to that folder, and what it was (lstat)."""

    relative: str
    st: os.stat_result

    @property
    def kind(self) -> str:
        return kind_of(self.st.st_mode)


def walk(root: Path, relative: str | PurePosixPath = "") -> Iterator[Entry]:
    """Everything below `root/relative`, parents before children, in name order; links are listed, never
    followed, and a folder swapped for something else while it is walked is not entered."""
    with folder(root, relative) as fd:
        yield from (entry for entry, _, _ in _walk(fd, ""))


def _walk(fd: int, prefix: str) -> Iterator[tuple[Entry, int, str]]:
    """Entries with their parent folder's descriptor (open while the entry is looked at) and their name."""
    with os.scandir(fd) as listing:
        entries = sorted(listing, key=lambda e: e.name)
    for entry in entries:
        st = entry.stat(follow_symlinks=False)
        rel = f"{prefix}{entry.name}"
        yield Entry(rel, st), fd, entry.name
        if stat.S_ISDIR(st.st_mode):
            try:
                child = os.open(entry.name, _DIR, dir_fd=fd)
            except OSError:
                continue           # gone or swapped meanwhile: not entered
            try:
                if (os.fstat(child).st_dev, os.fstat(child).st_ino) == (st.st_dev, st.st_ino):
                    yield from _walk(child, rel + "/")
            finally:
                os.close(child)


def change(root: Path, entry: Entry, mode: int | None = None, owner: tuple[int, int] | None = None) -> bool:
    """Set the mode and/or owner of a walked folder or file, through a descriptor of the very inode the walk
    saw (reached without links); False when it is gone, swapped, or not a folder or a file."""
    parts = _parts(entry.relative)
    try:
        with folder(root, PurePosixPath(*parts[:-1]) if parts[:-1] else "") as parent:
            return _change_at(parent, parts[-1], entry.st, mode, owner)
    except (FileNotFoundError, Refused):
        return False


def _change_at(parent: int, name: str, seen: os.stat_result, mode: int | None, owner: tuple[int, int] | None) -> bool:
    try:
        fd = os.open(name, _PATH, dir_fd=parent)
    except FileNotFoundError:
        return False
    try:
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (seen.st_dev, seen.st_ino) or not (
                stat.S_ISDIR(now.st_mode) or stat.S_ISREG(now.st_mode)):
            return False
        inode = f"/proc/self/fd/{fd}"   # the O_PATH descriptor's own inode: no name is looked up again
        if owner is not None and (now.st_uid, now.st_gid) != owner:
            os.chown(inode, *owner)
        if mode is not None and stat.S_IMODE(now.st_mode) != mode:
            os.chmod(inode, mode)
        return True
    finally:
        os.close(fd)


def give(root: Path, relative: str | PurePosixPath, owner: tuple[int, int] | None, dir_bits: int,
         file_bits: int) -> None:
    """A tree envmgr made for a run (a dataset copy, a method copy) handed to the run's user: `dir_bits` and
    `file_bits` added to its folders' and files' modes, owned by `owner` when given (and envmgr is root);
    links and special files are left as they are, never followed."""
    parts = _parts(relative)
    chown = owner if owner is not None and os.getuid() == 0 and owner != (0, 0) else None

    def add(parent: int, name: str, st: os.stat_result) -> None:
        is_dir = stat.S_ISDIR(st.st_mode)
        if is_dir or stat.S_ISREG(st.st_mode):
            _change_at(parent, name, st, stat.S_IMODE(st.st_mode) | (dir_bits if is_dir else file_bits), chown)

    with folder(root, PurePosixPath(*parts[:-1]) if parts[:-1] else "") as parent:
        try:
            top = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return
        add(parent, parts[-1], top)
        if not stat.S_ISDIR(top.st_mode):
            return
        fd = _open_child(parent, parts[-1], root.joinpath(*parts))
        try:
            for entry, at, name in _walk(fd, ""):
                add(at, name, entry.st)
        finally:
            os.close(fd)
