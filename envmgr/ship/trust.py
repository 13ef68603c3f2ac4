"""Strict checks for what travels: an archive's signature and structure, and the signature record of
an image in use (read by `envmgr verify`).

The chain an import walks, each link checked before anything is loaded:
signature -> `envmgr/export.json` bytes -> every member's sha256 -> the config member's sha256 is
the image ID -> the config's diff IDs are the layer members' sha256 -> `manifest.json` names exactly
that config, those layers and the one tag the archive's inputs give -> the method layer is the one
envmgr makes from the archive's method files.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from envmgr.core import paths
from envmgr.core.archive import contained
from envmgr.core.errors import UsageError
from envmgr.door.context import Context
from envmgr.ship import signing

SIGNATURE_MEMBER = "envmgr/signature.json"
SBOM_MEMBER = "envmgr/sbom.cdx.json"
SIGNATURES_DIR = "signatures"
IMAGE_STATEMENT_FORMAT = "envmgr-image/1"
CONTAINER_METHOD_PREFIX = paths.CONTAINER_METHOD_DIR.strip("/") + "/"


class TrustError(UsageError):
    """Refused for trust reasons (signature, structure): bad input, exit 2; nothing was loaded."""


def _open(path: Path) -> tuple[IO[bytes], IO[bytes]]:
    raw = open(path, "rb")
    magic = raw.read(2)
    raw.seek(0)
    return raw, (gzip.GzipFile(fileobj=raw, mode="rb") if magic == b"\x1f\x8b" else raw)  # type: ignore[return-value]


def read_head(path: Path, manifest_name: str) -> tuple[bytes, bytes | None]:
    """The raw bytes of the archive's manifest (its first member) and signature (second, if any)."""
    raw, stream = _open(path)
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            first = tar.next()
            if first is None or first.name != manifest_name or not first.isfile():
                raise TrustError(f"{path}: not an envmgr export (its first member is not {manifest_name})")
            if first.size > signing.MAX_SIGNATURE_BYTES * 1024:
                raise TrustError(f"{path}: its {manifest_name} is implausibly large ({first.size} bytes)")
            manifest = tar.extractfile(first).read()  # type: ignore[union-attr]
            second = tar.next()
            signature = None
            if second is not None and second.name == SIGNATURE_MEMBER:
                if not second.isfile() or second.size > signing.MAX_SIGNATURE_BYTES:
                    raise TrustError(f"{path}: {SIGNATURE_MEMBER} is not a small file; nothing was loaded")
                signature = tar.extractfile(second).read()  # type: ignore[union-attr]
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise TrustError(f"{path}: not a readable envmgr export ({exc}); nothing was loaded") from None
    finally:
        raw.close()
    return manifest, signature


def check_signature(ctx: Context, what: str, statement: bytes, signature: bytes | None) -> signing.SignatureCheck:
    """Check and, when the site's [trust] refuses it, raise naming the signer (or that none signed)."""
    found = signing.check(statement, signature, ctx.config.trust)
    reason = signing.refusal(found, ctx.config.trust)
    if reason is not None:
        raise TrustError(f"{what}: refused: {reason}; nothing was loaded",
                         hint="add the signer's public key to [trust] keys if it is your site's"
                         if found.state == "untrusted" else None)
    if found.state != "trusted":
        ctx.ui.warn(f"{what}: {found.describe()}")
    return found


def check_structure(path: Path, manifest: dict) -> None:
    """Names are unique, the config member's hash is the image ID, each layer's hash is its name."""
    names = [m.get("name") for m in manifest.get("members", [])]
    if len(names) != len(set(names)):
        raise TrustError(f"{path}: its member list names a member twice; nothing was loaded")
    image_hex = str(manifest.get("image_id", "")).removeprefix("sha256:")
    by_name = {m["name"]: m for m in manifest["members"]}
    config = by_name.get(f"{image_hex}.json")
    if config is None or config.get("sha256") != image_hex:
        raise TrustError(f"{path}: the image config in its member list is not image {image_hex[:12]}; "
                         "nothing was loaded")
    for name, entry in by_name.items():
        if name.endswith("/layer.tar") and entry.get("sha256") != name.split("/", 1)[0]:
            raise TrustError(f"{path}: layer {name} is listed with another hash; nothing was loaded")
    if "manifest.json" not in by_name:
        raise TrustError(f"{path}: no manifest.json in its member list; nothing was loaded")


def check_docker_manifest(path: Path, manifest_bytes: bytes, config: dict, image_id: str, tag: str) -> None:
    """manifest.json names exactly this config, its layers in order, and only `tag`."""
    try:
        entries = json.loads(manifest_bytes)
    except json.JSONDecodeError:
        raise TrustError(f"{path}: manifest.json is not JSON; nothing was loaded") from None
    image_hex = image_id.removeprefix("sha256:")
    layers = [f"{d.removeprefix('sha256:')}/layer.tar" for d in config.get("rootfs", {}).get("diff_ids", [])]
    if not isinstance(entries, list) or len(entries) != 1:
        raise TrustError(f"{path}: manifest.json must describe exactly one image; nothing was loaded")
    entry = entries[0]
    if entry.get("RepoTags") != [tag]:
        raise TrustError(f"{path}: manifest.json tags {entry.get('RepoTags')}, but the archive's inputs give "
                         f"exactly [{tag!r}]; nothing was loaded")
    if entry.get("Config") != f"{image_hex}.json" or entry.get("Layers") != layers:
        raise TrustError(f"{path}: manifest.json names another config or other layers than image "
                         f"{image_hex[:12]}; nothing was loaded")


def _entry_target(info: tarfile.TarInfo, source: Path) -> Path | None:
    """Where a method layer entry goes under `source` (None: not a method file); never outside it."""
    name = info.name.rstrip("/")
    if not name.startswith(CONTAINER_METHOD_PREFIX):
        return None
    target = contained(source, name[len(CONTAINER_METHOD_PREFIX):])
    if target is None:
        raise TrustError(f"method layer entry {info.name!r} would leave the method's folder; nothing was loaded")
    return target


def _write_file(tar: tarfile.TarFile, info: tarfile.TarInfo, target: Path) -> None:
    """A new file (never an existing one, never through a link) with the entry's bytes, streamed."""
    if not info.isfile():
        raise TrustError(f"method layer entry {info.name!r} is not a file, folder or link; nothing was loaded")
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o755 if info.mode & 0o111 else 0o644)
    with os.fdopen(fd, "wb") as out, tar.extractfile(info) as src:  # type: ignore[union-attr]
        while chunk := src.read(1 << 20):
            out.write(chunk)


def extract_method_files(layer_tar: Path, source: Path, skip: Callable[[str], bool]) -> None:
    """Write the method layer's /opt/envmgr/method tree under `source`; nothing may leave it.

    Files already staged (`skip`) are left as they are: the method layer made again from the staged
    files is compared with the archive's, so the two copies cannot disagree unnoticed.
    """
    source.mkdir(parents=True, exist_ok=True)
    links: list[tuple[Path, str]] = []
    try:
        with tarfile.open(layer_tar, mode="r:") as tar:
            for info in tar:
                target = _entry_target(info, source)
                if target is None or skip(target.relative_to(source).as_posix()):
                    continue
                if info.isdir():
                    target.mkdir(exist_ok=True)
                elif info.issym():
                    links.append((target, info.linkname))
                else:
                    _write_file(tar, info, target)
    except FileExistsError as exc:
        raise TrustError(f"the method layer names {exc.filename} twice; nothing was loaded") from None
    except (tarfile.TarError, OSError) as exc:
        raise TrustError(f"the method layer could not be read ({exc}); nothing was loaded") from None
    for target, link in links:  # links last: no file is ever written through one
        if os.path.lexists(target):
            raise TrustError(f"the method layer names {target.name} twice; nothing was loaded")
        target.symlink_to(link)


# ------------------------------------------------------------------ signature records of images in use


def image_statement(method: str, tag: str, image_id: str, inputs_hash: str, diff_ids: list[str]) -> bytes:
    """What a push signs: the image, its tag and inputs, and its layers."""
    return json.dumps({"format": IMAGE_STATEMENT_FORMAT, "method": method, "tag": tag, "image_id": image_id,
                       "inputs_hash": inputs_hash, "diff_ids": diff_ids}, sort_keys=True).encode()


def statement_layers(kind: str, statement: bytes) -> tuple[str, list[str]]:
    """(image ID, layer diff IDs) a signed statement names."""
    data = json.loads(statement)
    if kind == "export":
        layers = ["sha256:" + m["sha256"] for m in data["members"] if m["name"].endswith("/layer.tar")]
        layers += [entry["diff_id"] for entry in data.get("left_out") or []]   # a thin export's (signed) list
        return data["image_id"], sorted(set(layers))
    return data["image_id"], sorted(set(data["diff_ids"]))


def record_signature(ctx: Context, image_id: str, kind: str, statement: bytes, signature: bytes | None) -> None:
    """Keep what an import or pull checked, so `verify` can check it again later."""
    folder = ctx.cache_dir / SIGNATURES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{image_id.removeprefix('sha256:')}.json"
    if target.is_file() and signature_report(ctx, image_id, [])["state"] == "trusted" \
            and signing.check(statement, signature, ctx.config.trust).state != "trusted":
        return   # an unsigned or otherwise signed copy never replaces the trusted signature it came with
    record = {"kind": kind, "statement": base64.b64encode(statement).decode(),
              "signature": signature.decode() if signature else None}
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    os.replace(tmp, target)


def signature_report(ctx: Context, image_id: str, diff_ids: list[str]) -> dict:
    """The signature of the image in use, checked again: state, key, and whether the signed image ID and
    layer digests are the engine's."""
    target = ctx.cache_dir / SIGNATURES_DIR / f"{image_id.removeprefix('sha256:')}.json"
    if not target.is_file():
        found = signing.SignatureCheck("unsigned")
        return {**found.as_dict(), "recorded": False, "layers_match": None,
                "ok": signing.refusal(found, ctx.config.trust) is None,
                "describe": "no signature recorded for this image (built here, or imported unsigned)"}
    record = json.loads(target.read_text())
    statement = base64.b64decode(record["statement"])
    signature = record["signature"].encode() if record.get("signature") else None
    found = signing.check(statement, signature, ctx.config.trust)
    signed_id, signed_layers = statement_layers(record["kind"], statement)
    layers_match = signed_id == image_id and signed_layers == sorted(set(diff_ids))
    ok = signing.refusal(found, ctx.config.trust) is None and layers_match
    describe = found.describe() + ("" if layers_match else "; the engine's image or layers are not the signed ones")
    return {**found.as_dict(), "recorded": True, "layers_match": layers_match, "ok": ok, "describe": describe}


# ------------------------------------------------------------------ signatures beside registry images


def signature_tag(short: str) -> str:
    """The registry tag of an image's signature: `<inputs hash>.sig` beside `<inputs hash>`."""
    return f"{short}.sig"


def signature_image_archive(statement: bytes, signature: bytes, repo_tag: str, folder: Path) -> bytes:
    """A one-layer image holding statement.json and signature.json, as a docker-archive."""
    import io

    from envmgr.images.image import ExtraFile, ImageConfig, write_archive, write_layer

    layer = write_layer(folder / "signature-layer.tar", extra_files=[ExtraFile("statement.json", statement),
                                                                      ExtraFile("signature.json", signature)])
    config = ImageConfig(layers=[layer], labels={paths.LABEL_KIND: "signature"},
                         history=["envmgr signature"])
    out = io.BytesIO()
    write_archive(out, config, [repo_tag])
    return out.getvalue()


def read_signature_image(saved: bytes) -> tuple[bytes, bytes]:
    """(statement, signature) from `docker save` bytes of a signature image (legacy or OCI layout)."""
    import io

    with tarfile.open(fileobj=io.BytesIO(saved), mode="r:") as outer:
        manifest = json.loads(outer.extractfile("manifest.json").read())  # type: ignore[union-attr]
        layers = manifest[0]["Layers"]
        if len(layers) != 1:
            raise TrustError("a signature image has one layer; this one has "
                             f"{len(layers)}; nothing was loaded")
        layer = outer.extractfile(layers[0]).read()  # type: ignore[union-attr]
    found: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(layer), mode="r:") as inner:
        for info in inner:
            if info.isfile() and info.name in ("statement.json", "signature.json"):
                if info.size > signing.MAX_SIGNATURE_BYTES:
                    raise TrustError(f"signature image: {info.name} is too large; nothing was loaded")
                found[info.name] = inner.extractfile(info).read()  # type: ignore[union-attr]
    if set(found) != {"statement.json", "signature.json"}:
        raise TrustError("signature image: statement.json or signature.json is missing; nothing was loaded")
    return found["statement.json"], found["signature.json"]


def check_pulled(statement: bytes, pulled: dict, method: str, tag: str) -> None:
    """The pulled image is the one the signed statement names (ID, tag, method, layers)."""
    data = json.loads(statement)
    layers = sorted(set((pulled.get("RootFS") or {}).get("Layers") or []))
    if data.get("format") != IMAGE_STATEMENT_FORMAT or data.get("method") != method or data.get("tag") != tag:
        raise TrustError(f"the signed statement names {data.get('method')} {data.get('tag')}, not {method} {tag}; "
                         f"it was not tagged {tag}")
    if data.get("image_id") != pulled.get("Id") or sorted(set(data.get("diff_ids", []))) != layers:
        raise TrustError(f"the pulled image {str(pulled.get('Id'))[:19]} is not the signed "
                         f"{str(data.get('image_id'))[:19]}; it was not tagged {tag}")
