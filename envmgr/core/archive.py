"""Safe extraction of user-supplied archives (zip, tar, tar.gz) on the host.

No entry may leave the destination (`../`, absolute paths, links pointing out), sizes are capped
against archive bombs, and macOS junk (`__MACOSX/`, `._*`, `.DS_Store`) is dropped.
"""

from __future__ import annotations

import os
import shutil
import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

from envmgr.core.errors import UsageError

MAX_TOTAL_BYTES = 20 << 30     # 20 GiB unpacked
MAX_RATIO = 200                # unpacked / packed
MAX_ENTRIES = 200_000


def is_junk(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return any(p == "__MACOSX" or p == ".DS_Store" or p.startswith("._") for p in parts)


def _safe_target(dest: Path, name: str, archive: Path) -> Path | None:
    clean = name.replace("\\", "/")
    if clean.startswith("/") or (len(clean) > 1 and clean[1] == ":"):
        raise UsageError(f"{archive}: entry {name!r} has an absolute path; nothing was extracted")
    parts = [p for p in PurePosixPath(clean).parts if p not in ("", ".")]
    if ".." in parts:
        raise UsageError(f"{archive}: entry {name!r} escapes the destination (zip-slip); nothing was extracted")
    if not parts:
        return None
    return dest.joinpath(*parts)


def _check_layout(archive: Path, entries: list[tuple[Path, bool]], dest: Path) -> None:
    """Refuse an archive that holds one path both as a file (or link) and as a folder (`a`, then `a/b`):
    extracting it would fail half way, or write through what an earlier entry made."""
    files: set[tuple[str, ...]] = set()
    folders: set[tuple[str, ...]] = set()
    for target, is_dir in entries:
        parts = target.relative_to(dest).parts
        folders.update(parts[:i] for i in range(1, len(parts)))
        (folders if is_dir else files).add(parts)
    clash = files & folders
    if clash:
        raise UsageError(f"{archive}: {'/'.join(min(clash))!r} is both a file and a folder in the archive; "
                         "nothing was extracted", hint="repack the archive so each path is one or the other")


def contained(folder: Path, relative: str) -> Path | None:
    """`folder/relative` with its parent folders made, or None when it would leave `folder` (an absolute
    path, `..`, or a link on the way); nothing is created outside `folder`."""
    rel = PurePosixPath(relative)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        return None
    root = folder.resolve()
    target = folder.joinpath(*rel.parts)
    parent = folder
    for part in rel.parts[:-1]:       # one level at a time: a link is caught before anything is made through it
        parent = parent / part
        if parent.is_symlink() or not (parent.exists() or parent.parent.resolve().is_relative_to(root)):
            return None
        parent.mkdir(exist_ok=True)
    return target if target.parent.resolve().is_relative_to(root) else None


def kind(path: Path) -> str:
    if path.is_dir():
        return "dir"
    mode = path.stat().st_mode
    if not stat.S_ISREG(mode):
        raise UsageError(f"{path}: {_file_kind(mode)}, not a folder, a zip or a tar(.gz) archive")
    if zipfile.is_zipfile(path):
        return "zip"
    try:
        if tarfile.is_tarfile(path):
            return "tar"
    except OSError:
        pass
    raise UsageError(f"{path}: not a folder, a zip or a tar(.gz) archive")


def extract(source: Path, dest: Path) -> None:
    """Extract (or copy, for a folder) `source` into the empty folder `dest`."""
    what = kind(source)
    account = _Budget(source, source.stat().st_size if what != "dir" else 0)
    if what == "dir":
        _copy_folder(source, dest, account)
    elif what == "zip":
        _extract_zip(source, dest, account)
    else:
        _extract_tar(source, dest, account)


class _Budget:
    """Counts the bytes unpacked so far; refuses a possible archive bomb."""

    def __init__(self, source: Path, packed: int):
        self.source, self.packed, self.total = source, packed, 0

    def __call__(self, size: int) -> None:
        self.total += size
        if self.total > MAX_TOTAL_BYTES or (self.packed and self.total > max(self.packed * MAX_RATIO, 64 << 20)):
            raise UsageError(f"{self.source}: unpacks to more than allowed ({self.total >> 20} MiB so far): "
                             "refusing a possible archive bomb")


def _copy_folder(source: Path, dest: Path, account: _Budget) -> None:
    for root, dirs, files in os.walk(source):
        dirs[:] = [d for d in dirs if not is_junk(d)]
        for name in files:
            if is_junk(name):
                continue
            src = Path(root) / name
            rel = src.relative_to(source)
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            st = src.lstat()
            if stat.S_ISLNK(st.st_mode):
                link = os.readlink(src)
                if os.path.isabs(link) or ".." in PurePosixPath(link).parts:
                    continue  # a link out of the method is dropped
                target.symlink_to(link)
            elif stat.S_ISREG(st.st_mode):
                _copy_counted(src, target, account)
            else:
                raise UsageError(f"{src}: {_file_kind(st.st_mode)}, not a regular file; remove it from the "
                                 "repository (envmgr copies only files, folders and links inside it)")


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a special file"


def _copy_counted(src: Path, target: Path, account: _Budget) -> None:
    """Copy a regular file, counting the bytes really read (a file may grow while it is copied)."""
    fd = os.open(src, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise UsageError(f"{src}: not a regular file any more; nothing was added")
        with open(target, "wb") as out:
            while chunk := fh.read(1 << 20):
                account(len(chunk))
                out.write(chunk)
    shutil.copystat(src, target)


def _extract_zip(source: Path, dest: Path, account: _Budget) -> None:
    try:
        with zipfile.ZipFile(source) as zf:
            infos = zf.infolist()
            if len(infos) > MAX_ENTRIES:
                raise UsageError(f"{source}: too many entries ({len(infos)})")
            plan = []
            for info in infos:
                if is_junk(info.filename):
                    continue
                target = _safe_target(dest, info.filename, source)
                mode = (info.external_attr >> 16) & 0o170000
                if target is None:
                    continue
                if mode == stat.S_IFLNK:
                    raise UsageError(f"{source}: entry {info.filename!r} is a symbolic link; refusing it")
                plan.append((info, target))
            _check_layout(source, [(target, info.is_dir()) for info, target in plan], dest)
            for info, target in plan:
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                account(info.file_size)
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out)
                if (info.external_attr >> 16) & 0o111:
                    target.chmod(0o755)
    except zipfile.BadZipFile as exc:
        raise UsageError(f"{source}: corrupt zip archive ({exc})") from None
    except OSError as exc:
        raise UsageError(f"{source}: cannot extract it ({exc.strerror or exc}); nothing was kept") from None


def _extract_tar(source: Path, dest: Path, account: _Budget) -> None:
    try:
        with tarfile.open(source) as tf:
            members = tf.getmembers()
            if len(members) > MAX_ENTRIES:
                raise UsageError(f"{source}: too many entries ({len(members)})")
            plan = []
            for member in members:
                if is_junk(member.name):
                    continue
                target = _safe_target(dest, member.name, source)
                if target is not None:
                    plan.append((member, target))
            _check_layout(source, [(target, member.isdir()) for member, target in plan], dest)
            written: set[Path] = set()      # the regular files extracted so far
            for member, target in plan:
                _extract_member(tf, member, target, source, dest, account, written)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise UsageError(f"{source}: corrupt or truncated tar archive ({exc})") from None


def _extract_member(tf: tarfile.TarFile, member: tarfile.TarInfo, target: Path, source: Path, dest: Path,
                    account: _Budget, written: set[Path]) -> None:
    if member.issym() or member.islnk():
        link = member.linkname
        if os.path.isabs(link) or ".." in PurePosixPath(link).parts:
            raise UsageError(f"{source}: entry {member.name!r} links outside the archive; refusing it")
        target.parent.mkdir(parents=True, exist_ok=True)
        if member.issym():
            target.symlink_to(link)
            return
        # a hard link names a file earlier in the archive: extracted as a copy of it
        original = _safe_target(dest, link, source)
        if original is None or original not in written:
            raise UsageError(f"{source}: entry {member.name!r} is a hard link to {link!r}, which is not a file "
                             "earlier in the archive; nothing was extracted")
        account(original.stat().st_size)
        shutil.copyfile(original, target, follow_symlinks=False)
        target.chmod(stat.S_IMODE(original.stat().st_mode))
        written.add(target)
    elif member.isdir():
        target.mkdir(parents=True, exist_ok=True)
    elif member.isfile():
        account(member.size)
        target.parent.mkdir(parents=True, exist_ok=True)
        src = tf.extractfile(member)
        if src is None:  # a regular file always has contents; nothing to copy otherwise
            return
        with src, open(target, "wb") as out:
            shutil.copyfileobj(src, out)
        if member.mode & 0o111:
            target.chmod(0o755)
        written.add(target)


def single_top_folder(root: Path) -> Path:
    """A repository zipped with its own top folder: descend into it."""
    entries = [p for p in root.iterdir() if not is_junk(p.name)]
    while len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink():
        root = entries[0]
        entries = [p for p in root.iterdir() if not is_junk(p.name)]
    return root
