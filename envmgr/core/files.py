"""Writing a file so that a reader sees the old contents or the new ones, never half of them."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from envmgr.core.errors import UsageError


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write `data` under a temporary name beside `path`, then rename it over `path`.

    The temporary name is unique, so two writers never share it; a failure leaves `path` as it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".envmgr-tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def open_lock(path: Path):
    """Open (creating it) a lock file for `fcntl.flock`, never through a link: lock files may sit in a
    shared folder such as /tmp, where anyone can plant `path` as a link to a file of theirs or ours."""
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        raise UsageError(f"{path}: envmgr will not use it as its lock ({exc.strerror}"
                         + ("; it is a symbolic link" if path.is_symlink() else "") + ")",
                         hint="remove it, then run the command again") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UsageError(f"{path}: envmgr will not use it as its lock (not a regular file)",
                         hint="remove it, then run the command again")
    return os.fdopen(fd, "r+")
