"""`--file SRC:REL`: a host file or folder placed into the method's folder at REL for one run, without a
rebuild — for launchers that read `config/<name>/config.json` relative to themselves. With
`workdir = "method"` it is copied into the run's writable copy (`<run_dir>/work/method/REL`); otherwise it
is mounted read-only over `/opt/envmgr/method/REL` in the image. Recorded (source, path, hash) in run.json
and placed again from the recorded source on --resume, like `--input`.

Placing never follows a link inside the copy (a method wrote that folder and may have left links there):
every folder on the way is opened with O_NOFOLLOW relative to the one before it."""

from __future__ import annotations

import errno
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from envmgr.core import paths
from envmgr.core.errors import UsageError
from envmgr.runs import records

FILE_HINT = "--file SRC:REL, REL relative to the method's folder (e.g. --file cfg.json:config/my/config.json)"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW


@dataclass(frozen=True)
class RunFile:
    source: Path     # absolute, on the host
    path: str        # relative to the method's folder, normalized

    def target(self, method_dir: str) -> str:
        return f"{method_dir}/{self.path}"


def relative_path(rel: str, given: str) -> str:
    """REL as a clean relative POSIX path inside the method's folder, or a usage error."""
    parts = PurePosixPath(rel).parts
    if not rel or "\0" in rel or PurePosixPath(rel).is_absolute() or ".." in parts or not parts:
        raise UsageError(f"--file {given}: {rel!r} is not a path inside the method's folder "
                         "(relative, no '..')", hint=FILE_HINT)
    if parts[0] == ".":
        parts = parts[1:]
    if not parts:
        raise UsageError(f"--file {given}: REL names the method's folder itself", hint=FILE_HINT)
    return "/".join(parts)


def parse_file(text: str) -> RunFile:
    """`SRC:REL` (REL is what follows the last colon)."""
    raw, sep, rel = text.rpartition(":")
    if not sep or not raw:
        raise UsageError(f"--file {text!r}: expected SRC:REL", hint=FILE_HINT)
    path = relative_path(rel, text)
    source = Path(raw).expanduser()
    if not source.exists():
        raise UsageError(f"--file {text}: {source} does not exist", hint="give an existing file or folder")
    source = source.resolve()
    if not (source.is_file() or source.is_dir()):
        raise UsageError(f"--file {text}: {source} is neither a file nor a folder")
    return RunFile(source, path)


def _check_apart(files: list[RunFile]) -> None:
    for i, one in enumerate(files):
        for other in files[i + 1:]:
            a, b = PurePosixPath(one.path), PurePosixPath(other.path)
            if a == b or a in b.parents or b in a.parents:
                raise UsageError(f"--file: {one.path!r} and {other.path!r} overlap",
                                 hint="place each file once, or one folder that holds them")


def parse_files(texts: list[str]) -> list[RunFile]:
    files = [parse_file(text) for text in texts]
    _check_apart(files)
    return files


def recorded_files(record: dict[str, Any], run_dir: Path) -> list[RunFile]:
    """The files a run was given, from envmgr's record: each path clean and each source still there."""
    where = run_dir / records.RECORD
    entries = record.get("files") or []
    if not isinstance(entries, list):
        raise UsageError(f"{where}: its files are not a list")
    found = []
    for entry in entries:
        raw = entry.get("source") if isinstance(entry, dict) else None
        rel = entry.get("path") if isinstance(entry, dict) else None
        if not isinstance(rel, str) or not isinstance(raw, str) or not Path(raw).is_absolute():
            raise UsageError(f"{where}: a file without an absolute source and a path ({entry!r})")
        path = relative_path(rel, f"{raw}:{rel} (recorded)")
        if not Path(raw).exists():
            raise UsageError(f"the file {raw} this run placed at {path} is gone",
                             hint="give it again: `--file SRC:REL` with --resume")
        found.append(RunFile(Path(raw).resolve(), path))
    _check_apart(found)
    return found


def given_files(texts: list[str], previous: dict | None, run_dir: Path) -> list[RunFile]:
    """`--file` as given, or on --resume without it, as the run's record says."""
    return parse_files(texts) if texts or previous is None else recorded_files(previous, run_dir)


def mounts_over_image(files: list[RunFile]) -> list[tuple[Path, str]]:
    """For a method without a per-run copy (workdir = "run"): each file's read-only mount over its image folder."""
    return [(f.source, f.target(paths.CONTAINER_METHOD_DIR)) for f in files]


# ---------------------------------------------------------------------- placing into the writable copy


class _Placer:
    """Copies into a folder opened by fd, creating what is missing, owned by the run's user."""

    def __init__(self, owner: tuple[int, int] | None, shown: str):
        self.owner = owner      # (uid, gid) to hand new entries to when envmgr runs as root
        self.shown = shown      # the REL being placed, for messages

    def refuse(self, why: str) -> UsageError:
        return UsageError(f"--file: cannot place {self.shown!r} in the method's copy: {why}",
                          hint="envmgr does not follow links in the method's copy; place it elsewhere, "
                               "or start a new run")

    def _own(self, fd: int, mode: int) -> None:
        if self.owner is not None:
            os.fchown(fd, *self.owner)
        os.fchmod(fd, mode)

    def enter(self, dir_fd: int, name: str, make: bool = True) -> int:
        """The folder `name` under `dir_fd`, made when missing; a link or a file there is refused."""
        if make:
            try:
                os.mkdir(name, 0o700, dir_fd=dir_fd)
            except FileExistsError:
                pass
            else:
                made = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
                self._own(made, 0o755)
                return made
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise self.refuse(f"{name!r} on the way is a link or not a folder") from None
            raise

    def file(self, source: Path, dir_fd: int, name: str) -> None:
        """`source`'s bytes at `name`: a file or link there is replaced (unlink never follows), a folder refused."""
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise self.refuse(f"{name!r} is a folder there; a file cannot replace it")
        if st is not None:
            os.unlink(name, dir_fd=dir_fd)
        mode = (source.stat().st_mode & 0o777) | 0o600       # the owner can write what it was given
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dir_fd)
        with open(fd, "wb") as out, source.open("rb") as src:
            shutil.copyfileobj(src, out, 1 << 20)
            self._own(out.fileno(), mode)

    def tree(self, source: Path, dir_fd: int) -> None:
        """A folder's files and folders into the folder `dir_fd` (what is there already stays, files are
        replaced); links in the source are followed to files, links to folders and special files skipped."""
        for entry in sorted(os.scandir(source), key=lambda e: e.name):
            if entry.is_dir(follow_symlinks=False):
                sub = self.enter(dir_fd, entry.name)
                try:
                    self.tree(Path(entry.path), sub)
                finally:
                    os.close(sub)
            elif entry.is_file():
                self.file(Path(entry.path), dir_fd, entry.name)


def place_files(files: list[RunFile], copy: Path, user: str) -> None:
    """Each file or folder into the run's method copy at its REL, for `user` (uid:gid)."""
    uid, gid = (int(x) for x in user.split(":"))
    owner = (uid, gid) if os.getuid() == 0 and (uid, gid) != (0, 0) else None
    try:
        root = os.open(copy, _DIR_FLAGS)
    except OSError as exc:
        raise UsageError(f"{copy}: cannot open the method's copy ({exc.strerror})") from None
    try:
        for run_file in files:
            _place(run_file, root, _Placer(owner, run_file.path))
    finally:
        os.close(root)


def _place(run_file: RunFile, root: int, placer: _Placer) -> None:
    *folders, name = run_file.path.split("/")
    fd = os.dup(root)
    try:
        for folder in folders:
            inner = placer.enter(fd, folder)
            os.close(fd)
            fd = inner
        if run_file.source.is_dir():
            kind = _kind(fd, name)
            if kind == "file":
                raise placer.refuse(f"{name!r} is a file there; a folder cannot replace it")
            if kind == "link":
                os.unlink(name, dir_fd=fd)     # the link itself gives way (unlink never follows)
            inner = placer.enter(fd, name)
            try:
                placer.tree(run_file.source, inner)
            finally:
                os.close(inner)
        else:
            placer.file(run_file.source, fd, name)
    except PermissionError as exc:
        raise UsageError(f"--file {run_file.source}:{run_file.path}: {exc.strerror} ({exc.filename or ''})",
                         hint="make the source readable by the user envmgr runs as") from None
    finally:
        os.close(fd)


def _kind(dir_fd: int, name: str) -> str | None:
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    return "link" if stat.S_ISLNK(st.st_mode) else "dir" if stat.S_ISDIR(st.st_mode) else "file"
