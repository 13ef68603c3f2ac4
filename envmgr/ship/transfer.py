"""`envmgr export` / `envmgr import`: one file that carries a method to a server that reaches nothing.

The file is a tar that is also a docker-archive (`docker load` takes it as is and ignores the
`envmgr/` members). It holds, in this order:

    envmgr/export.json          what the archive is, the method's inputs, and the sha256 + size of
                                every other member (written first, so an import can refuse early)
    envmgr/signature.json       (with --sign) a detached ed25519 signature over export.json's bytes
    envmgr/method/...           the spec, the lock files and the method's files that lie outside its
                                source folder; the source folder's files travel once, in the method layer
    envmgr/sbom.cdx.json        the image's CycloneDX SBOM (covered by the member list, so by the signature)
    <config sha256>.json        the image config
    <diff id>/layer.tar         base, environment and method layers (their diff IDs are their sha256)
    manifest.json               the docker-archive manifest, tagged envmgr/<m>:<inputs hash>

Every member has a fixed mtime, uid/gid 0 and a fixed order, so exporting the same image twice gives
the same bytes. The default is no compression: the layers are mostly shared libraries and wheels'
contents, an uncompressed tar is written and loaded at disk speed, and `docker load` reads it
without a decompression pass. `--compress gzip` writes a gzip stream with mtime 0 and no file name
(deterministic for a given zlib), for links where bytes cost more than time. `--thin-for` leaves out
the layers a target server already has and lists them, signed, in export.json (see thin.py).
"""

from __future__ import annotations

import dataclasses
import errno
import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from envmgr.build.layer_bytes import exported_config, with_layer_files
from envmgr.build.target import inputs, installer_id, lock_hash, method_excludes, require_image
from envmgr.core import names, paths
from envmgr.core.archive import contained
from envmgr.core.errors import EngineError, EnvmgrError, UsageError
from envmgr.core.spec import MethodSpec, find_method, load_spec, name_problem
from envmgr.door.context import Context
from envmgr.images.base import BaseImage, _load as load_base_image, current_base
from envmgr.images.image import CHUNK, CountingReader, archive_parts, file_sha256, tarinfo, tree_hash
from envmgr.lock.backends import get_backend
from envmgr.ship.manifest import FORMAT, MANIFEST, ArchiveError, read_signed_manifest
from envmgr.ship.trust import SBOM_MEMBER, SIGNATURE_MEMBER

if TYPE_CHECKING:
    from envmgr.ship.signing import SignatureCheck

METHOD_PREFIX = "envmgr/method/"
ENGINE_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}





# ------------------------------------------------------------------------------------------- export


@dataclass
class Member:
    name: str
    part: str                 # what it is, in the user's words ("environment layer", "lock file poetry.lock")
    size: int = 0
    sha256: str = ""
    path: Path | None = None  # read from this file ...
    data: bytes | None = None  # ... or from memory
    link: str | None = None   # a symlink (method files only)
    mode: int = 0o644

    def entry(self) -> dict:
        found: dict[str, str | int] = {"name": self.name, "part": self.part}
        if self.link is not None:
            found["link"] = self.link
        else:
            found.update(size=self.size, sha256=self.sha256, mode=self.mode)
        return found


def _from_bytes(name: str, part: str, data: bytes) -> Member:
    return Member(name, part, len(data), hashlib.sha256(data).hexdigest(), data=data)


def method_members(spec: MethodSpec, in_layer: bool = False) -> list[Member]:
    """The spec, the lock files and the method's files (exactly those the inputs hash covers).

    `in_layer`: leave out the source folder's files (not the spec and lock files): the method layer
    carries them, and an import takes them from there.
    """
    folder = spec.folder.resolve()
    found: dict[str, Member] = {}

    def add(path: Path, part: str) -> None:
        try:
            rel = path.relative_to(folder).as_posix()
        except ValueError:
            raise UsageError(f"{spec.name}: {path} lies outside the method's folder {folder}; "
                             "export needs source_dir and lock_dir inside it") from None
        name = METHOD_PREFIX + rel
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            found[name] = Member(name, part, link=os.readlink(path))
        else:
            sha, size = file_sha256(path)
            found[name] = Member(name, part, size, sha, path=path, mode=0o755 if st.st_mode & 0o111 else 0o644)

    add(folder / paths.SPEC_FILE, "spec")
    for lock_file in get_backend(spec).lock_files(spec):
        if lock_file.is_file():
            add(lock_file, f"lock file {lock_file.name}")
    excluded = method_excludes(spec)
    source = spec.source_path
    if in_layer:
        return [found[name] for name in sorted(found)]
    for dirpath, dirnames, filenames in os.walk(source):
        dirnames[:] = sorted(d for d in dirnames if not excluded(os.path.relpath(Path(dirpath) / d, source)))
        for name in sorted(filenames + [d for d in dirnames if (Path(dirpath) / d).is_symlink()]):
            path = Path(dirpath) / name
            rel = os.path.relpath(path, source)
            if not excluded(rel):
                add(path, f"method file {rel}")
    return [found[name] for name in sorted(found)]


@dataclass
class ExportResult:
    method: str
    file: Path
    tag: str
    image_id: str
    size: int                     # the archive's bytes on disk
    compress: str                 # "none" | "gzip"
    signed_by: str | None = None  # the signing key's ID, with --sign
    thin_for: str | None = None   # with --thin-for: the target's image ID
    left_out: int = 0             # layers left out (the target has them)
    left_out_bytes: int = 0

    def fields(self) -> dict:
        """The result as the JSON event carries it."""
        found = {"method": self.method, "file": str(self.file), "tag": self.tag, "image_id": self.image_id,
                 "bytes": self.size, "compress": self.compress, "signed_by": self.signed_by}
        if self.thin_for is not None:
            found.update(thin_for=self.thin_for, left_out=self.left_out, left_out_bytes=self.left_out_bytes)
        return found


def export(ctx: Context, method: str, out: Path | None, compress: str = "none",
           sign: Path | None = None, thin_for: str | None = None) -> ExportResult:
    wanted, image_id = require_image(ctx, method)
    spec, base, data, digest, tag = wanted.spec, wanted.base, wanted.inputs, wanted.digest, wanted.tag
    config = exported_config(ctx, wanted, image_id)
    if compress not in ("none", "gzip"):
        raise UsageError(f"--compress {compress!r}: expected none or gzip")
    out = out or Path(f"{spec.name}-{digest[:16]}.envmgr.tar" + (".gz" if compress == "gzip" else ""))

    from envmgr.build import sbom
    from envmgr.ship import signing, thin

    key = signing.load_private_key(sign) if sign else None
    left_out: list[dict] = []
    target_id = None
    if thin_for is not None:
        target_id, target = thin.target_layers(ctx, thin_for)
        left_out = thin.left_out_entries(config, thin.shared_prefix([la.diff_id for la in config.layers], target))
        if not left_out:
            ctx.ui.warn(f"--thin-for {thin_for}: {target_id[:19]} shares no leading layers with {tag}: "
                        "writing a full archive")
    skipped = {entry["diff_id"] for entry in left_out}
    with with_layer_files(ctx, config, image_id, skip=frozenset(skipped)) as config:
        config_bytes, layer_names, docker_manifest = archive_parts(config, [tag])
        members = method_members(spec, in_layer=True)
        members.append(_from_bytes(SBOM_MEMBER, "SBOM", sbom.sbom_bytes(ctx, spec, base, config)))
        members.append(_from_bytes(f"{config.image_id().split(':')[1]}.json", "image config", config_bytes))
        layer_parts = ["base layer", *["system packages layer" if line.startswith("envmgr system packages")
                                       else "environment layer" for line in config.history[1:-1]], "method layer"]
        for name, layer, part in zip(layer_names, config.layers, layer_parts, strict=False):
            if layer.diff_id not in skipped and not any(m.name == name for m in members):
                members.append(Member(name, part, layer.size, layer.diff_id.split(":", 1)[1], path=layer.path))
        members.append(_from_bytes("manifest.json", "docker-archive manifest", docker_manifest))
        manifest = {
            "format": FORMAT, "method": spec.name, "tag": tag, "image_id": image_id, "inputs_hash": digest,
            "inputs": data, "architecture": config.architecture, "os": "linux", "builtin": spec.builtin,
            "base": {k: v for k, v in asdict(base).items() if k != "layer_path"},
            "members": [m.entry() for m in members],
        }
        if left_out:   # in export.json, so covered by the signature: the list cannot be edited unnoticed
            manifest.update({"format": thin.THIN_FORMAT, thin.LEFT_OUT: left_out,
                             thin.THIN_FOR: {"image_id": target_id}})
        manifest_bytes = json.dumps(manifest, indent=1, sort_keys=True).encode()
        if key is not None:
            members.insert(0, _from_bytes(SIGNATURE_MEMBER, "signature", signing.sign(manifest_bytes, key)))
        total = sum(m.size for m in members)
        if compress == "none":
            free = shutil.disk_usage(out.resolve().parent).free
            if free < total + (1 << 20):
                raise EnvmgrError(f"not enough space for {out}: it needs {total / 1e6:.0f} MB, "
                                  f"{free / 1e6:.0f} MB free; nothing was written")
        write_atomically(out, lambda fh: _write_members(fh, manifest_bytes, members, compress, ctx, out), ctx)
        size = out.stat().st_size
        return ExportResult(spec.name, out, tag, image_id, size, compress,
                            signed_by=signing.key_id(key.public_key()) if key else None,
                            thin_for=target_id, left_out=len(left_out),
                            left_out_bytes=sum(entry["size"] for entry in left_out))


def _write_members(raw, manifest_bytes: bytes, members: list[Member], compress: str, ctx: Context,
                   out: Path) -> None:
    stream = gzip.GzipFile(filename="", mode="wb", compresslevel=6, fileobj=raw, mtime=0) \
        if compress == "gzip" else raw
    total = sum(m.size for m in members)
    with ctx.ui.progress(f"exporting to {out}", total=total, unit="bytes") as task:
        with tarfile.open(fileobj=stream, mode="w", format=tarfile.GNU_FORMAT) as tar:
            tar.addfile(tarinfo(MANIFEST, tarfile.REGTYPE, 0o644, len(manifest_bytes)), io.BytesIO(manifest_bytes))
            dirs: set[str] = set()
            for member in members:
                parent = str(PurePosixPath(member.name).parent)
                if parent != "." and not member.name.startswith("envmgr/") and parent not in dirs:
                    dirs.add(parent)  # the layer folders of a docker-archive
                    tar.addfile(tarinfo(parent, tarfile.DIRTYPE, 0o755))
                if member.link is not None:
                    tar.addfile(tarinfo(member.name, tarfile.SYMTYPE, 0o777, linkname=member.link))
                elif member.data is not None:
                    tar.addfile(tarinfo(member.name, tarfile.REGTYPE, member.mode, member.size),
                                io.BytesIO(member.data))
                    task.advance(member.size)
                else:
                    assert member.path is not None
                    with open(member.path, "rb") as fh:
                        tar.addfile(tarinfo(member.name, tarfile.REGTYPE, member.mode, member.size),
                                    CountingReader(fh, task.advance))
    if stream is not raw:
        stream.close()


def _chunks(fh, advance):
    """The file as a stream of chunks (sent with chunked encoding), counted for the progress bar."""
    while chunk := fh.read(CHUNK):
        advance(len(chunk))
        yield chunk



def write_atomically(out: Path, write, ctx: Context) -> None:
    """Write under a temporary name beside `out`, then rename: a failure leaves nothing under `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise EnvmgrError(f"disk full while writing {out}: no archive was written",
                              hint="free space there or choose another place with -o") from None
        raise EnvmgrError(f"could not write {out}: {exc.strerror or exc}; no archive was written") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------------------- import


def _open(path: Path):
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    with open(path, "rb") as fh:
        magic = fh.read(2)
    raw = open(path, "rb")
    return raw, (gzip.GzipFile(fileobj=raw, mode="rb") if magic == b"\x1f\x8b" else raw)


class _MemberEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: names.MemberName
    part: str
    link: str | None = None
    size: int = Field(default=0, ge=0)
    sha256: names.Sha256Hex | None = None
    mode: int = Field(default=0o644, ge=0, le=0o7777)

    @model_validator(mode="after")
    def _file_or_link(self) -> "_MemberEntry":
        if (self.link is None) == (self.sha256 is None):
            raise ValueError("a member is either a link or a file with its sha256")
        return self


class _BaseEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: names.BaseImageName
    image_id: names.Digest
    diff_id: names.Digest
    python: str
    python_version: str
    packages: dict[str, str]


class _ExportManifest(BaseModel):
    """What export.json must be before any of its values names a path, a tag or a member."""

    model_config = ConfigDict(extra="allow", strict=True)

    method: names.MethodName
    tag: names.ImageTag
    image_id: names.Digest
    architecture: names.Architecture
    inputs: dict[str, str]
    base: _BaseEntry
    members: list[_MemberEntry]


def check_manifest_fields(path: Path, manifest: dict) -> None:
    """Every field of export.json that envmgr uses has its type and, for names, its full form; a name
    that would climb out of a folder (`../x`, `/root/.ssh`) or end in a newline is refused here,
    before anything is created."""
    try:
        _ExportManifest.model_validate(manifest)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "export.json"
        raise ArchiveError(f"{path}: its export.json is malformed at {where!r}: {first['msg']}; "
                           "nothing was loaded") from None
    problem = name_problem(manifest["method"])
    if problem:
        raise ArchiveError(f"{path}: its method name {manifest['method']!r} is not valid ({problem}); "
                           "nothing was loaded")


def engine_architecture(ctx: Context) -> str:
    machine = ctx.engine.architecture()
    return ENGINE_ARCH.get(machine, machine)


SMALL_MAX = 16 << 20   # a member held in memory (config, manifest.json, a lock) is at most this big


def verify_members(path: Path, manifest: dict, keep: dict[str, Path], ctx: Context) -> dict[str, bytes]:
    """Read the whole archive once, streamed: every member's size and sha256 against the manifest.

    Members named in `keep` are written to those files, never held in memory; other small members
    (the config, manifest.json) are returned. Layers are only hashed. Raises ArchiveError naming the
    part that failed.
    """
    expected = {m["name"]: m for m in manifest["members"]}
    seen: set[str] = set()
    small: dict[str, bytes] = {}
    current = "the archive's header"
    raw, stream = _open(path)
    total = sum(m.get("size", 0) for m in manifest["members"])
    try:
        with ctx.ui.progress(f"checking {path.name}", total=total, unit="bytes") as task, \
                tarfile.open(fileobj=stream, mode="r|") as tar:
            for position, info in enumerate(tar):
                current = f"member {info.name}"
                # the head members are read from their own places only (trust.read_head): a second
                # export.json or signature further on is an unlisted member like any other
                if (position, info.name) in ((0, MANIFEST), (1, SIGNATURE_MEMBER)):
                    continue
                if info.isdir() and f"{info.name}/layer.tar" in expected:
                    continue
                entry = expected.get(info.name)
                if entry is None:
                    raise ArchiveError(f"{path}: unexpected member {info.name!r} (not in the manifest); "
                                       "nothing was loaded")
                current = f"{entry['part']} ({info.name})"
                seen.add(info.name)
                if "link" in entry:
                    if not info.issym() or info.linkname != entry["link"]:
                        raise ArchiveError(f"{path}: {entry['part']} is not the link the manifest names; "
                                           "nothing was loaded")
                    continue
                content = _verify_file_member(path, tar, info, entry, keep.get(info.name), task.advance)
                if content is not None:
                    small[info.name] = content
    except ArchiveError:
        raise
    except (tarfile.TarError, EOFError, OSError, zlib_error()) as exc:
        raise ArchiveError(f"{path}: truncated or unreadable at {current} ({exc}); nothing was loaded") from None
    finally:
        raw.close()
    missing = [expected[name]["part"] for name in expected if name not in seen]
    if missing:
        raise ArchiveError(f"{path}: truncated: missing {', '.join(missing)}; nothing was loaded")
    return small


def _verify_file_member(path: Path, tar: tarfile.TarFile, info: tarfile.TarInfo, entry: dict, keep: Path | None,
                        advance: Callable[[int], object]) -> bytes | None:
    """One regular member, streamed once: its size and sha256 against the manifest's `entry`. Written to
    `keep` when given; a layer is only hashed; any other member is small (the config, manifest.json) and
    returned, so a member claiming to be one cannot fill memory."""
    if not info.isfile() or info.size != entry["size"]:
        raise ArchiveError(f"{path}: {entry['part']} has {info.size} bytes, the manifest says "
                           f"{entry['size']}; nothing was loaded")
    sha = hashlib.sha256()
    source = tar.extractfile(info)
    assert source is not None  # info.isfile() was checked above
    if keep is None and not info.name.endswith("/layer.tar") and info.size > SMALL_MAX:
        raise ArchiveError(f"{path}: {entry['part']} is too large to be what it says "
                           f"({info.size} bytes); nothing was loaded")
    sink = open(keep, "wb") if keep is not None else None
    buffer = None if info.name.endswith("/layer.tar") or sink else bytearray()
    try:
        while chunk := source.read(CHUNK):
            sha.update(chunk)
            advance(len(chunk))
            if sink:
                sink.write(chunk)
            if buffer is not None:
                buffer += chunk
    finally:
        if sink:
            sink.close()
    if sha.hexdigest() != entry["sha256"]:
        raise ArchiveError(f"{path}: {entry['part']} is damaged (sha256 {sha.hexdigest()[:16]}…, "
                           f"expected {entry['sha256'][:16]}…); nothing was loaded")
    return bytes(buffer) if buffer is not None else None


def zlib_error():
    import zlib

    return zlib.error


def _method_hashes(spec: MethodSpec, ctx: Context) -> dict[str, str]:
    return {"lock": lock_hash(ctx, spec), "spec": spec.spec_hash(),
            "method_files": tree_hash(spec.source_path, method_excludes(spec))}


def _differences(have: dict[str, str], want: dict[str, str]) -> list[str]:
    return [key for key in sorted(want) if key in have and have[key] != want[key]]


@dataclass
class ImportResult:
    method: str
    tag: str
    image_id: str
    changed: bool                  # False: the image, method and base were here already
    signature: dict                # signing.SignatureCheck.as_dict(): state, key_id
    registered: bool = False       # the method's files were written (added or replaced)
    base_installed: bool = False   # the archive's base became current here
    loaded: bool = False           # the image was loaded into the engine

    def fields(self) -> dict:
        """The result as the JSON event carries it (what changed only when something did)."""
        found: dict = {"method": self.method, "tag": self.tag, "image_id": self.image_id, "changed": self.changed}
        if self.changed:
            found.update(registered=self.registered, base_installed=self.base_installed, loaded=self.loaded)
        return {**found, "signature": self.signature}


def import_archive(ctx: Context, path: Path, replace_base: bool = False, replace: bool = False) -> ImportResult:
    from envmgr.build import sbom
    from envmgr.ship import thin, trust

    manifest, manifest_bytes, signature, signed = _checked_manifest(ctx, path)
    name, tag, image_id = manifest["method"], manifest["tag"], manifest["image_id"]
    register = _must_register(ctx, path, name, manifest["inputs"], replace)
    base_info = manifest["base"]
    left_out = {entry["diff_id"] for entry in manifest.get(thin.LEFT_OUT) or []}
    install_base = _must_install_base(ctx, path, base_info, left_out, replace_base)
    loaded = ctx.engine.image_id(tag) == image_id
    if not loaded and left_out:
        missing = thin.missing_layers(ctx, manifest)
        if missing:
            raise ArchiveError(thin.refusal(path, manifest, missing),
                               hint="import the full archive, or first the image the thin one was made for")
    if loaded and not register and not install_base:
        ctx.engine.tag(image_id, tag.rsplit(":", 1)[0], "latest")
        trust.record_signature(ctx, image_id, "export", manifest_bytes, signature)
        return ImportResult(name, tag, image_id, changed=False, signature=signed.as_dict())

    # Verify every member, then stage the method files and check they give the archive's inputs.
    base_dir = base_info_dir(ctx, base_info["name"])
    base_hex = base_info["diff_id"].split(":", 1)[1]
    methods_root = ctx.config.base_dir / "methods"
    methods_root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=methods_root, prefix=".import-"))
    base_tmp = base_dir / f".{base_hex}.tar.partial"
    try:
        before = _stamp(path)
        folder, sbom_tmp = _verify_and_stage(ctx, path, manifest, staging, base_info,
                                             base_tmp if install_base else None)
        if _stamp(path) != before:   # what is loaded must be what was checked
            raise ArchiveError(f"{path} changed while it was being checked; nothing was loaded")
        if not loaded:
            _load_into_engine(ctx, path, manifest, left_out)
        ctx.engine.tag(image_id, tag.rsplit(":", 1)[0], "latest")
        trust.record_signature(ctx, image_id, "export", manifest_bytes, signature)
        if sbom_tmp.is_file():
            sbom.store(ctx, image_id, sbom_tmp.read_bytes())
        if install_base:
            _make_base_current(ctx, base_info, base_dir / f"{base_hex}.tar", base_tmp)
        if register:
            _register_method(methods_root, name, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        base_tmp.unlink(missing_ok=True)
    return ImportResult(name, tag, image_id, changed=True, signature=signed.as_dict(), registered=register,
                        base_installed=install_base, loaded=not loaded)


def _checked_manifest(ctx: Context, path: Path) -> tuple[dict, bytes, bytes | None, SignatureCheck]:
    """The archive's manifest, trusted before anything else is read: its fields, its signature, its
    structure and listing, then this engine's architecture and this envmgr's installer (an image built by
    another installer would never be found by `envmgr build` here). With the signature check."""
    from envmgr.ship import thin, trust

    manifest, manifest_bytes, signature = read_signed_manifest(path)
    check_manifest_fields(path, manifest)   # before any of its names is used
    signed = trust.check_signature(ctx, str(path), manifest_bytes, signature)   # before anything else
    trust.check_structure(path, manifest)
    thin.check_listing(path, manifest)
    name = manifest["method"]
    here = engine_architecture(ctx)
    if manifest.get("architecture") != here:
        raise ArchiveError(f"{path}: {name} was built for {manifest.get('os')}/{manifest.get('architecture')}, "
                           f"this engine runs {here}; nothing was loaded")
    want = manifest["inputs"]
    installer = installer_id(ctx)
    if want.get("installer") != installer:
        raise ArchiveError(f"{path}: exported by an envmgr whose installer is {want.get('installer')}, this one "
                           f"has {installer}: `envmgr build` here would not find the image",
                           hint="install the same envmgr version on both servers")
    return manifest, manifest_bytes, signature, signed


def _must_register(ctx: Context, path: Path, name: str, want: dict[str, str], replace: bool) -> bool:
    """Whether the archive's method files must be written here: not when the same method is here already
    (built-in or added); a different built-in one, or an added one without `replace`, refuses the import."""
    existing: MethodSpec | None
    try:
        existing = find_method(name, ctx.config.base_dir)
    except UsageError:
        existing = None
    if existing is None:
        return True
    differs = _differences(_method_hashes(existing, ctx), want)
    if not differs:
        return False
    if existing.builtin:
        raise UsageError(f"{path}: the built-in method {name} here differs from the archive's "
                         f"({', '.join(differs)}); nothing was loaded")
    if not replace:
        raise UsageError(f"{path}: method {name} is already added here with another {', '.join(differs)}; "
                         "nothing was loaded", hint="`--replace` replaces the added method's files")
    return True


def _must_install_base(ctx: Context, path: Path, base_info: dict, left_out: set[str], replace_base: bool) -> bool:
    """Whether the archive's base must become current here: another current base refuses the import without
    `replace_base`; a thin archive that left the base layer out cannot install it."""
    base = current_base(ctx, base_info["name"])
    install_base = base is None or base.image_id != base_info["image_id"]
    if base is not None and install_base and not replace_base:
        raise UsageError(f"{path}: base image {base_info['name']} here is {base.image_id[:19]}, the archive's is "
                         f"{base_info['image_id'][:19]}; nothing was loaded",
                         hint="`--replace-base` makes the archive's base current here (other methods then "
                              "build on it too)")
    if install_base and base_info["diff_id"] in left_out:
        raise ArchiveError(f"{path}: a thin archive without the base layer, and this server's base "
                           f"{base_info['name']} is not its {base_info['image_id'][:19]}; nothing was loaded",
                           hint="import a full archive (`envmgr export` without --thin-for)")
    return install_base


def _load_into_engine(ctx: Context, path: Path, manifest: dict, left_out: set[str]) -> None:
    """The checked archive into the engine, which must then report the manifest's image ID under its tag. A
    thin archive's load fails when a layer it left out went meanwhile: that says which."""
    from envmgr.ship import thin

    tag, image_id = manifest["tag"], manifest["image_id"]
    with open(path, "rb") as fh, ctx.ui.progress(f"loading {tag} into the engine",
                                                 total=path.stat().st_size, unit="bytes") as task:
        try:
            ctx.engine.load_archive(_chunks(fh, task.advance))
        except EngineError:
            missing = thin.missing_layers(ctx, manifest) if left_out else []
            if missing:   # removed between the check and the load (a gc meanwhile)
                raise ArchiveError(thin.refusal(path, manifest, missing)) from None
            raise
    if ctx.engine.image_id(tag) != image_id:
        raise EnvmgrError(f"the engine did not report {image_id[:19]} as {tag} after loading {path}")


def _make_base_current(ctx: Context, base_info: dict, layer_path: Path, base_tmp: Path) -> None:
    """The verified base layer to its place, loaded into the engine, then recorded as current."""
    os.replace(base_tmp, layer_path)
    new_base = BaseImage(**{**base_info, "layer_path": str(layer_path)})
    load_base_image(ctx, new_base)
    (layer_path.parent / "current.json").write_text(json.dumps(asdict(new_base), indent=1, sort_keys=True))


def _register_method(methods_root: Path, name: str, folder: Path) -> None:
    """The staged method folder becomes the method's; a replaced one is first moved aside, then removed."""
    final = names.beneath(methods_root, name)
    if final.exists():
        old = methods_root / f".replaced-{name}-{os.getpid()}"
        os.replace(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(folder, final)


def _stamp(path: Path) -> tuple[int, int, int, int]:
    st = path.stat()
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _verify_and_stage(ctx: Context, path: Path, manifest: dict, staging: Path, base_info: dict,
                      base_tmp: Path | None) -> tuple[Path, Path]:
    """Check every member while streaming it once, stage the method's files (from `envmgr/method/` and
    the method layer), and check the chain: manifest.json, inputs, tag, method layer. Returns the staged
    method folder and the SBOM file."""
    from envmgr.build.target import image_tag, inputs_digest, method_layer
    from envmgr.ship import thin, trust

    name, tag, image_id, want = manifest["method"], manifest["tag"], manifest["image_id"], manifest["inputs"]
    folder = names.beneath(staging, name)
    keep, links = _stage_targets(manifest, folder)
    layer_names = {m["part"]: m["name"] for m in manifest["members"] if m["name"].endswith("/layer.tar")}
    method_tar, sbom_tmp = staging / "method-layer.tar", staging / "sbom.cdx.json"
    keep[layer_names.get("method layer", "")] = method_tar
    keep[SBOM_MEMBER] = sbom_tmp
    if base_tmp is not None:
        keep[f"{base_info['diff_id'].split(':', 1)[1]}/layer.tar"] = base_tmp
    small = verify_members(path, manifest, keep, ctx)
    config = json.loads(small[f"{image_id.split(':', 1)[1]}.json"])
    here = engine_architecture(ctx)
    if config.get("architecture") != here:
        raise ArchiveError(f"{path}: the image config says {config.get('architecture')}, this engine runs "
                           f"{here}; nothing was loaded")
    trust.check_docker_manifest(path, small["manifest.json"], config, image_id, tag)
    thin.check_config(path, manifest, config)
    last_layer = config["rootfs"]["diff_ids"][-1]
    if layer_names.get("method layer") != f"{last_layer.split(':', 1)[1]}/layer.tar" or not method_tar.is_file():
        raise ArchiveError(f"{path}: the member listed as the method layer is not the image's last layer; "
                           "nothing was loaded")
    _finish_staging(manifest, keep, links)
    staged = load_spec(folder / paths.SPEC_FILE, builtin=False)
    trust.extract_method_files(method_tar, staged.source_path, lambda rel: os.path.lexists(staged.source_path / rel))
    layer_path = base_tmp or Path(base_info.get("layer_path") or "")
    got = inputs(ctx, staged, BaseImage(**{**base_info, "layer_path": str(layer_path)}))
    if got != want:
        raise ArchiveError(f"{path}: its method files give other inputs than its manifest "
                           f"({', '.join(_differences(got, want))}); nothing was loaded")
    if tag != image_tag(staged, inputs_digest(want)):
        raise ArchiveError(f"{path}: its tag {tag} is not the one its inputs give "
                           f"({image_tag(staged, inputs_digest(want))}); nothing was loaded")
    # the method layer made here from the staged files, in a scratch cache: refused input leaves no cache entry
    scratch = Context(config=dataclasses.replace(ctx.config, cache_dir=staging / "cache"), ui=ctx.ui,
                      _engine=ctx._engine)
    remade = method_layer(scratch, staged, want, inputs_digest(want))
    if remade.diff_id != last_layer:
        raise ArchiveError(f"{path}: its method layer is not the one its method files make ({last_layer[:19]}, "
                           f"made here {remade.diff_id[:19]}); nothing was loaded",
                           hint="was it exported by another envmgr version?")
    return folder, sbom_tmp


def _finish_staging(manifest: dict, targets: dict[str, Path], links: list[tuple[Path, str]]) -> None:
    """Give the staged method files their modes, then make the links (after every file is written)."""
    modes = {m["name"]: m.get("mode", 0o644) for m in manifest["members"]}
    for member_name, member_path in targets.items():
        if member_name.startswith(METHOD_PREFIX):
            member_path.chmod(modes[member_name] & 0o755)
    for link_path, link in links:
        link_path.symlink_to(link)


def base_info_dir(ctx: Context, name: str) -> Path:
    folder = names.beneath(ctx.store_dir / "base", name)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _stage_targets(manifest: dict, folder: Path) -> tuple[dict[str, Path], list[tuple[Path, str]]]:
    """Where each method member goes under `folder` (files), and the links to make once they are
    written; no member may leave the folder, and no file is written through a link."""
    folder.mkdir(parents=True)
    targets: dict[str, Path] = {}
    links: list[tuple[Path, str]] = []
    for entry in manifest["members"]:
        name = entry["name"]
        if not name.startswith(METHOD_PREFIX):
            continue
        target = contained(folder, name[len(METHOD_PREFIX):])
        if target is None:
            raise ArchiveError(f"member {name!r} would leave the method's folder; nothing was loaded")
        if "link" in entry:
            links.append((target, entry["link"]))
        else:
            targets[name] = target
    linked = {t for t, _ in links}
    for target in targets.values():
        if any(parent in linked for parent in target.parents):
            raise ArchiveError(f"method file {target.relative_to(folder)} lies under a link; nothing was loaded")
    return targets, links
