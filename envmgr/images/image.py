"""Deterministic layers and images: envmgr writes the tar files and the image config itself.

Docker's own builder stamps creation times into every image. Here every entry has a fixed
mtime, uid/gid 0 and sorted order, the config has a fixed `created`, and the image ID (the
sha256 of the config bytes) depends on nothing but the content.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import stat
import tarfile
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO, cast, overload

# 2000-01-01T00:00:00Z: a fixed time for every entry and the config (0 confuses some tools).
EPOCH = 946684800
CREATED = "2000-01-01T00:00:00Z"
CHUNK = 1 << 20


class CountingWriter(io.RawIOBase):
    """A file wrapper that counts what goes through it (and answers `tell`, which a pipe cannot)."""

    def __init__(self, raw):
        self.raw = raw
        self.size = 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.size

    def write(self, data) -> int:
        self.size += len(data)
        self.raw.write(data)
        return len(data)


class HashingWriter(CountingWriter):
    """A file wrapper that hashes what goes through it."""

    def __init__(self, raw):
        super().__init__(raw)
        self.sha = hashlib.sha256()

    def write(self, data) -> int:
        self.sha.update(data)
        return super().write(data)


@dataclass
class ExtraFile:
    """A file that a layer adds from memory (shims, metadata)."""

    path: str
    data: bytes
    mode: int = 0o644
    link: str = ""      # a symbolic link to this target instead of a file


@dataclass
class Layer:
    path: Path          # the uncompressed layer tar on disk (absent for a measured or released layer)
    diff_id: str        # sha256:<hex> of the uncompressed tar
    size: int
    trees: tuple[tuple[Path, str], ...] = ()   # a measured layer: the host trees its bytes are made from


def _parents(target: str) -> list[str]:
    parts = PurePosixPath(target.strip("/")).parts
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def tarinfo(name: str, kind: bytes, mode: int, size: int = 0, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode & 0o7777
    info.size = size
    info.linkname = linkname
    info.mtime = EPOCH
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def layer_entries(trees: Iterable[tuple[Path, str]] = (), extra_files: Iterable[ExtraFile] = ()
                  ) -> dict[str, tuple[str, Path | ExtraFile | None]]:
    """Every entry of a layer holding each host `tree` under its image path, plus `extra_files`, by name."""
    entries: dict[str, tuple[str, Path | ExtraFile | None]] = {}
    for source, target in trees:
        for parent in _parents(target):
            entries.setdefault(parent, ("dir", None))
        base = target.strip("/")
        for root, dirs, files in os.walk(source):
            rel_root = os.path.relpath(root, source)
            for name in dirs + files:
                host = Path(root) / name
                rel = name if rel_root == "." else f"{rel_root}/{name}"
                entries[f"{base}/{rel}"] = ("host", host)
    for extra in extra_files:
        for parent in _parents(str(PurePosixPath(extra.path).parent)):
            entries.setdefault(parent, ("dir", None))
        entries[extra.path.strip("/")] = ("extra", extra)
    return entries


def write_layer(out: Path, trees: Iterable[tuple[Path, str]] = (), extra_files: Iterable[ExtraFile] = (),
                progress: Callable[[int], None] | None = None) -> Layer:
    """Write a layer tar holding each host `tree` under its image path, plus `extra_files`.

    Entries are sorted by path; hard links become plain files; sockets and devices are skipped.
    The file is written under a temporary name and renamed when complete.
    """
    entries = layer_entries(trees, extra_files)
    tmp = out.with_name(out.name + ".partial")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(tmp, "wb") as raw:
            writer = _write_entries(raw, entries, progress)
    except BaseException:
        tmp.unlink(missing_ok=True)   # a failed or interrupted write leaves no partial layer behind
        raise
    os.replace(tmp, out)
    return Layer(path=out, diff_id="sha256:" + writer.sha.hexdigest(), size=writer.size)


def measure_layer(trees: list[tuple[Path, str]], at: Path, progress: Callable[[int], None] | None = None) -> Layer:
    """The layer of these host trees, hashed but not written: its bytes are made again from the trees when
    they are sent (`open_layer`), so a layer that goes straight into the engine is never on disk twice.
    `at` is where the layer's file would be (it does not exist)."""
    digest, size = hash_pieces(layer_pieces(layer_entries(trees)), progress)
    return Layer(path=at, diff_id="sha256:" + digest, size=size, trees=tuple(trees))


@contextlib.contextmanager
def open_layer(layer: Layer, verify: bool = True) -> Iterator[BinaryIO]:
    """The layer's bytes: its file, or, for a measured layer, its tar made again from its trees (checked
    against its size, and with `verify` its diff ID, as it goes: trees changed since they were measured
    fail the read). Without `verify` the reader must check the digest itself: the engine's loader does,
    for every layer it registers, so a load need not hash the bytes twice."""
    if layer.path.is_file() or not layer.trees:
        with open(layer.path, "rb") as fh:
            yield fh
        return
    read_end, write_end = os.pipe()
    result: dict = {}

    def produce() -> None:
        try:
            with os.fdopen(write_end, "wb", buffering=CHUNK) as sink:
                result["writer"] = _write_entries(sink, layer_entries(layer.trees), None, hashing=verify)
        except BaseException as exc:  # noqa: BLE001 - reported to the reader below
            result["error"] = exc

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    source = os.fdopen(read_end, "rb", buffering=CHUNK)
    try:
        yield cast(BinaryIO, _Checked(source, layer, result, thread))
    finally:
        source.close()     # a producer still writing gets a broken pipe and stops
        thread.join()


class _Checked:
    """Reads a measured layer's regenerated bytes; at their end, checks they are the measured ones."""

    def __init__(self, source: BinaryIO, layer: Layer, result: dict, thread: threading.Thread):
        self.source, self.layer, self.result, self.thread = source, layer, result, thread
        self.left = layer.size

    def read(self, size: int = -1) -> bytes:
        data = self.source.read(size if size >= 0 else self.left)
        self.left -= len(data)
        if self.left <= 0 or not data:
            if self.left <= 0:
                extra = self.source.read(1)   # the measured size is the whole tar: nothing may follow
                self.source.close()           # a producer writing more stops on a broken pipe
                if extra:
                    self.result.setdefault("writer", None)
                    self.result["error"] = OSError("more bytes than measured")
            self.thread.join()
            writer = self.result.get("writer")
            error = self.result.get("error")
            if error is not None and not isinstance(error, BrokenPipeError):
                raise error
            if writer is None or writer.size != self.layer.size or \
                    (isinstance(writer, HashingWriter) and "sha256:" + writer.sha.hexdigest() != self.layer.diff_id):
                raise OSError(f"layer {self.layer.diff_id[:19]} changed after it was measured "
                              "(its files were modified meanwhile)")
        return data


@overload
def _write_entries(raw, entries: dict[str, tuple[str, Path | ExtraFile | None]],
                   progress: Callable[[int], None] | None) -> HashingWriter: ...


@overload
def _write_entries(raw, entries: dict[str, tuple[str, Path | ExtraFile | None]],
                   progress: Callable[[int], None] | None, hashing: bool) -> CountingWriter: ...


def _write_entries(raw, entries: dict[str, tuple[str, Path | ExtraFile | None]],
                   progress: Callable[[int], None] | None, hashing: bool = True) -> CountingWriter:
    writer = HashingWriter(raw) if hashing else CountingWriter(raw)
    # 1 MiB copies: a few GB of files go through here, and 16 KiB ones cost as much again in Python calls
    with tarfile.open(fileobj=writer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        tar.copybufsize = CHUNK  # type: ignore[attr-defined]  # a TarFile attribute typeshed omits
        for name in sorted(entries):
            kind, item = entries[name]
            if kind == "dir":
                tar.addfile(tarinfo(name, tarfile.DIRTYPE, 0o755))
            elif kind == "extra":
                assert isinstance(item, ExtraFile)
                if item.link:
                    tar.addfile(tarinfo(name, tarfile.SYMTYPE, 0o777, linkname=item.link))
                    continue
                tar.addfile(tarinfo(name, tarfile.REGTYPE, item.mode, len(item.data)), io.BytesIO(item.data))
                if progress:
                    progress(len(item.data))
            else:
                assert isinstance(item, Path)
                st = item.lstat()
                if stat.S_ISLNK(st.st_mode):
                    tar.addfile(tarinfo(name, tarfile.SYMTYPE, 0o777, linkname=os.readlink(item)))
                elif stat.S_ISDIR(st.st_mode):
                    tar.addfile(tarinfo(name, tarfile.DIRTYPE, st.st_mode))
                elif stat.S_ISREG(st.st_mode):
                    with open(item, "rb") as fh:
                        tar.addfile(tarinfo(name, tarfile.REGTYPE, st.st_mode, st.st_size), fh)
                    if progress:
                        progress(st.st_size)
    return writer


# ---------------------------------------------------------------------- a layer or archive as pieces
# The bytes `_write_entries` and `write_archive` make, described instead of made: header bytes, and
# (file, size) where a file's contents go. A loader can hand those files to the kernel (sendfile), so the
# environment's bytes go from the page cache to the engine without passing through Python.

Piece = bytes | tuple[Path, int]
_NUL_BLOCK = tarfile.NUL * tarfile.BLOCKSIZE


def _header(info: tarfile.TarInfo) -> bytes:
    return info.tobuf(tarfile.GNU_FORMAT, tarfile.ENCODING, "surrogateescape")


def _padding(size: int) -> bytes:
    return tarfile.NUL * (-size % tarfile.BLOCKSIZE)


def _tar_end(offset: int) -> bytes:
    """What TarFile.close writes after the last member: two zero blocks, then zeros to a whole record."""
    offset += 2 * tarfile.BLOCKSIZE
    return _NUL_BLOCK * 2 + tarfile.NUL * (-offset % tarfile.RECORDSIZE)


def pieces_size(pieces: Iterable[Piece]) -> int:
    return sum(len(piece) if isinstance(piece, bytes) else piece[1] for piece in pieces)


def layer_pieces(entries: dict[str, tuple[str, Path | ExtraFile | None]]) -> list[Piece]:
    """The bytes `_write_entries` writes for `entries`, as pieces (file contents by reference, sized by lstat)."""
    pieces: list[Piece] = []
    offset = 0

    def add(piece: Piece) -> None:
        nonlocal offset
        pieces.append(piece)
        offset += len(piece) if isinstance(piece, bytes) else piece[1]

    for name in sorted(entries):
        kind, item = entries[name]
        if kind == "dir":
            add(_header(tarinfo(name, tarfile.DIRTYPE, 0o755)))
        elif kind == "extra":
            assert isinstance(item, ExtraFile)
            if item.link:
                add(_header(tarinfo(name, tarfile.SYMTYPE, 0o777, linkname=item.link)))
                continue
            add(_header(tarinfo(name, tarfile.REGTYPE, item.mode, len(item.data))) + item.data
                + _padding(len(item.data)))
        else:
            assert isinstance(item, Path)
            st = item.lstat()
            if stat.S_ISLNK(st.st_mode):
                add(_header(tarinfo(name, tarfile.SYMTYPE, 0o777, linkname=os.readlink(item))))
            elif stat.S_ISDIR(st.st_mode):
                add(_header(tarinfo(name, tarfile.DIRTYPE, st.st_mode)))
            elif stat.S_ISREG(st.st_mode):
                add(_header(tarinfo(name, tarfile.REGTYPE, st.st_mode, st.st_size)))
                if st.st_size:
                    add((item, st.st_size))
                    add(_padding(st.st_size))
    add(_tar_end(offset))
    return _merged(pieces)


def _merged(pieces: list[Piece]) -> list[Piece]:
    """Neighbouring header bytes joined (fewer writes)."""
    merged: list[Piece] = []
    for piece in pieces:
        if isinstance(piece, bytes) and merged and isinstance(merged[-1], bytes):
            merged[-1] = merged[-1] + piece
        elif not isinstance(piece, bytes) or piece:
            merged.append(piece)
    return merged


def _members(config: ImageConfig, layer_names: list[str], present: frozenset[str]) -> Iterator[tuple[str, Layer]]:
    """(member name, layer) of each layer an archive carries, in image order: a layer listed twice once, and
    none the target engine already holds (`present`). write_archive and archive_pieces both walk this."""
    seen = set()
    for name, layer in zip(layer_names, config.layers, strict=True):
        if name in seen:
            continue
        seen.add(name)
        if layer.diff_id not in present:
            yield name, layer


def archive_pieces(config: ImageConfig, repo_tags: list[str], present: frozenset[str] = frozenset()) -> list[Piece]:
    """`write_archive`'s archive as pieces: the same members in the same order.

    A layer with a file is that file; a measured layer is its tar made again from its trees, whose size
    must still be the measured one (a tree changed since is an error here; changed contents of the same
    size reach the engine, which refuses a layer whose bytes do not hash to the config's diff ID).
    """
    config_bytes, layer_names, manifest = archive_parts(config, repo_tags)
    image_hex = hashlib.sha256(config_bytes).hexdigest()
    pieces: list[Piece] = [_header(tarinfo(f"{image_hex}.json", tarfile.REGTYPE, 0o644, len(config_bytes)))
                           + config_bytes + _padding(len(config_bytes))]
    for name, layer in _members(config, layer_names, present):
        pieces.append(_header(tarinfo(name.split("/")[0], tarfile.DIRTYPE, 0o755))
                      + _header(tarinfo(name, tarfile.REGTYPE, 0o644, layer.size)))
        if layer.path.is_file() or not layer.trees:
            size = layer.path.stat().st_size
            body: list[Piece] = [(layer.path, size)]
        else:
            body = layer_pieces(layer_entries(layer.trees))
            size = pieces_size(body)
        if size != layer.size:
            raise OSError(f"layer {layer.diff_id[:19]} changed after it was measured ({size} bytes, measured "
                          f"{layer.size}): its files were modified meanwhile")
        pieces += [*body, _padding(size)]
    pieces.append(_header(tarinfo("manifest.json", tarfile.REGTYPE, 0o644, len(manifest))) + manifest
                  + _padding(len(manifest)))
    pieces.append(_tar_end(pieces_size(pieces)))
    return _merged(pieces)


def hash_pieces(pieces: Iterable[Piece], progress: Callable[[int], None] | None = None) -> tuple[str, int]:
    """(sha256 hex, size) of the bytes the pieces stand for: file contents read into one buffer and hashed
    (hashlib lets go of the GIL on large updates, so threads hash in parallel), no tar made."""
    sha = hashlib.sha256()
    buffer = memoryview(bytearray(CHUNK))
    total = 0
    for piece in pieces:
        if isinstance(piece, bytes):
            sha.update(piece)
            total += len(piece)
            continue
        path, size = piece
        with open(path, "rb", buffering=0) as fh:
            left = size
            while left:
                got = fh.readinto(buffer[:min(CHUNK, left)])
                if not got:
                    raise OSError(f"{path}: shorter than its {size} bytes (changed while it was read)")
                sha.update(buffer[:got])
                left -= got
        total += size
        if progress:
            progress(size)
    return sha.hexdigest(), total


def write_pieces(out: BinaryIO, pieces: Iterable[Piece], progress: Callable[[int], None] | None = None) -> int:
    """Write pieces to a file object (tests and tools; the engine loader sends them with sendfile)."""
    total = 0
    for piece in pieces:
        if isinstance(piece, bytes):
            out.write(piece)
            total += len(piece)
            continue
        path, size = piece
        with open(path, "rb") as fh:
            left = size
            while left:
                chunk = fh.read(min(CHUNK, left))
                if not chunk:
                    raise OSError(f"{path}: shorter than its {size} bytes (changed while it was sent)")
                out.write(chunk)
                left -= len(chunk)
        total += size
        if progress:
            progress(size)
    return total


# ---------------------------------------------------------------------- layers out of `docker save`

# a layer's member in `docker save` output: legacy `<v1 id>/layer.tar`, or an OCI blob `blobs/sha256/<hex>`
_LAYER_MEMBER = re.compile(r"(^|/)layer\.tar$|^blobs/sha256/[0-9a-f]{64}$")


class ChunkReader(io.RawIOBase):
    """A readable file over an iterator of byte chunks (the engine's HTTP stream)."""

    def __init__(self, chunks: Iterable[bytes]):
        self._chunks = iter(chunks)
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._pending:
            try:
                self._pending = next(self._chunks)
            except StopIteration:
                return 0
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


def save_layers(chunks: Iterable[bytes], wanted: dict[str, int | None], into: Path) -> dict[str, Path]:
    """Pick the layers `wanted` (diff ID -> size, None when unknown) out of a `docker save` stream into
    `into/<hex>`.

    Only members of a wanted size are written and hashed (any size when one is unknown); the rest are
    skipped as they stream by. Returns the layers found (diff ID -> file); one whose bytes hash to no
    wanted diff ID is dropped.
    """
    any_size = None in wanted.values()
    sizes = set(wanted.values())
    found: dict[str, Path] = {}
    reader = io.BufferedReader(ChunkReader(chunks), buffer_size=CHUNK)
    with tarfile.open(fileobj=reader, mode="r|") as tar:
        for info in tar:
            if not info.isfile() or not (any_size or info.size in sizes) or not _LAYER_MEMBER.search(info.name):
                continue
            source = tar.extractfile(info)
            if source is None:
                continue
            fd, tmp_name = tempfile.mkstemp(dir=into, prefix=".from-engine-")
            sha = hashlib.sha256()
            with os.fdopen(fd, "wb") as out:
                while chunk := source.read(CHUNK):
                    sha.update(chunk)
                    out.write(chunk)
            diff_id = "sha256:" + sha.hexdigest()
            if diff_id in wanted and diff_id not in found:
                final = into / sha.hexdigest()
                os.replace(tmp_name, final)
                found[diff_id] = final
            else:
                os.unlink(tmp_name)
            if len(found) == len(wanted):
                break
    return found



def file_sha256(path: Path) -> tuple[str, int]:
    """(sha256 hex, size) of a file, read in chunks."""
    sha = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            sha.update(chunk)
            size += len(chunk)
    return sha.hexdigest(), size


def file_layer(path: Path) -> Layer:
    """A layer from an existing uncompressed tar (e.g. a debuerreotype rootfs)."""
    digest, size = file_sha256(path)
    return Layer(path=path, diff_id="sha256:" + digest, size=size)


@dataclass
class ImageConfig:
    layers: list[Layer]
    env: dict[str, str] = field(default_factory=dict)
    cmd: list[str] | None = None
    entrypoint: list[str] | None = None
    workdir: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    history: list[str] = field(default_factory=list)   # one "created_by" per layer
    architecture: str = "amd64"

    def to_bytes(self) -> bytes:
        config: dict = {"Env": [f"{k}={v}" for k, v in self.env.items()], "Labels": dict(sorted(self.labels.items()))}
        if self.cmd:
            config["Cmd"] = self.cmd
        if self.entrypoint:
            config["Entrypoint"] = self.entrypoint
        if self.workdir:
            config["WorkingDir"] = self.workdir
        document = {
            "architecture": self.architecture,
            "os": "linux",
            "created": CREATED,
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in self.layers]},
            "history": [{"created": CREATED, "created_by": text} for text in self.history],
        }
        return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()

    def image_id(self) -> str:
        return "sha256:" + hashlib.sha256(self.to_bytes()).hexdigest()


def archive_parts(config: ImageConfig, repo_tags: list[str]) -> tuple[bytes, list[str], bytes]:
    """A docker-archive's config bytes, layer member names (config order) and manifest.json bytes."""
    config_bytes = config.to_bytes()
    image_hex = hashlib.sha256(config_bytes).hexdigest()
    layer_names = [f"{layer.diff_id.split(':', 1)[1]}/layer.tar" for layer in config.layers]
    manifest = json.dumps([{"Config": f"{image_hex}.json", "RepoTags": repo_tags, "Layers": layer_names}],
                          separators=(",", ":")).encode()
    return config_bytes, layer_names, manifest


def write_archive(out, config: ImageConfig, repo_tags: list[str],
                  progress: Callable[[int], None] | None = None, present: frozenset[str] = frozenset(),
                  verify_measured: bool = True) -> str:
    """Write a docker-archive (manifest.json + config + layer tars) to a binary file object.

    Returns the image ID. The archive bytes depend only on the config, layers and tags.
    Layers in `present` (diff IDs whose layer chain the target engine already holds) are named in
    the manifest but their bytes are left out: the engine's loader looks a layer chain up before
    it opens the file, so a rebuild that only changed the method files sends only those.
    """
    config_bytes, layer_names, manifest = archive_parts(config, repo_tags)
    image_hex = hashlib.sha256(config_bytes).hexdigest()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        tar.addfile(tarinfo(f"{image_hex}.json", tarfile.REGTYPE, 0o644, len(config_bytes)), io.BytesIO(config_bytes))
        for name, layer in _members(config, layer_names, present):
            tar.addfile(tarinfo(name.split("/")[0], tarfile.DIRTYPE, 0o755))
            with open_layer(layer, verify=verify_measured) as fh:
                tar.addfile(tarinfo(name, tarfile.REGTYPE, 0o644, layer.size), CountingReader(fh, progress))
        tar.addfile(tarinfo("manifest.json", tarfile.REGTYPE, 0o644, len(manifest)), io.BytesIO(manifest))
    return "sha256:" + image_hex


class CountingReader:
    """A file wrapper that reports how many bytes were read (for progress bars)."""

    def __init__(self, fh, progress):
        self.fh = fh
        self.progress = progress

    def read(self, size=-1):
        data = self.fh.read(size)
        if self.progress and data:
            self.progress(len(data))
        return data


def tree_hash(root: Path, exclude: Callable[[str], bool] = lambda rel: False) -> str:
    """Content hash of a directory: relative paths, modes' executable bit and file bytes."""
    sha = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not exclude(os.path.relpath(Path(dirpath) / d, root)))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            rel = os.path.relpath(path, root)
            if exclude(rel):
                continue
            st = path.lstat()
            sha.update(rel.encode() + b"\0")
            if stat.S_ISLNK(st.st_mode):
                sha.update(b"L" + os.readlink(path).encode())
            else:
                sha.update(b"X" if st.st_mode & 0o111 else b"F")
                with open(path, "rb") as fh:
                    while chunk := fh.read(CHUNK):
                        sha.update(chunk)
            sha.update(b"\0")
    return sha.hexdigest()
