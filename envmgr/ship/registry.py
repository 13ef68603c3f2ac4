"""`envmgr push` / `envmgr pull`: a method's image through a registry, by its content-hash tag.

The image goes as `<registry>/envmgr/<m>:<inputs hash>`; a pull asks for the tag this server's
inputs give and checks the image's lock and inputs labels against the method's current lock, so
what runs is what the lock says. Credentials come from the engine's credential store (the docker
SDK reads ~/.docker/config.json and its helpers) or ENVMGR_REGISTRY_USER / ENVMGR_REGISTRY_PASSWORD,
and are redacted from every line.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from envmgr.build.target import require_image, target
from envmgr.core import paths
from envmgr.core.errors import EnvmgrError, Exit, UsageError
from envmgr.core.files import atomic_write, open_lock
from envmgr.core.spec import MethodSpec, find_method
from envmgr.door.context import Context
from envmgr.door.engine import PushPullRefused
from envmgr.images.base import current_base
from envmgr.lock.backends import get_backend

USER_VAR = "ENVMGR_REGISTRY_USER"
PASSWORD_VAR = "ENVMGR_REGISTRY_PASSWORD"
PUSHED_FILE = "pushed.json"


class RegistryError(EnvmgrError):
    """The registry did not answer or refused: exit 5, as for a mirror."""

    exit_code = Exit.MIRROR


def credentials(ctx: Context, registry: str) -> dict | None:
    """ENVMGR_REGISTRY_USER/PASSWORD if set (registered as secrets); else None: the engine's store."""
    user, password = os.environ.get(USER_VAR), os.environ.get(PASSWORD_VAR)
    if not (user and password):
        return None
    ctx.ui.add_secrets([password, f"{user}:{password}"])
    return {"username": user, "password": password, "serveraddress": registry}


def _check_registry(registry: str) -> str:
    registry = registry.strip().rstrip("/")
    if not registry or "://" in registry or "@" in registry or " " in registry:
        raise UsageError(f"registry {registry!r}: expected host[:port], e.g. 127.0.0.1:5000 "
                         "(credentials go in ENVMGR_REGISTRY_USER / ENVMGR_REGISTRY_PASSWORD)")
    return registry


def _stream(ctx: Context, start, verb: str, registry: str, total: int,
            layers: dict[str, str] | None = None, done: dict[str, int] | None = None) -> dict:
    """Start the push or pull and follow the engine's JSON progress; returns the last `aux` (digest).

    `layers`, when given, is filled with what became of each layer: "pushed", or "existing" when the
    registry had the blob already, in this repository or another one it mounts it from (the engine sends
    nothing then); `done` with the bytes read per layer."""
    aux: dict = {}
    done = {} if done is None else done
    try:
        with ctx.ui.progress(f"{verb} {registry}", total=total or None, unit="bytes") as task:
            for line in start():
                if "error" in line or "errorDetail" in line:
                    detail = line.get("error") or line.get("errorDetail", {}).get("message", "")
                    raise RegistryError(f"registry {registry} refused or did not answer the {verb}: "
                                        f"{ctx.ui.redact(str(detail))}",
                                        hint="is the registry up, and are the credentials right?")
                if "aux" in line:
                    aux = line["aux"]
                layer = line.get("id")
                current = (line.get("progressDetail") or {}).get("current")
                if layer and isinstance(current, int) and line.get("status") in ("Pushing", "Downloading"):
                    task.advance(max(0, current - done.get(layer, 0)))
                    done[layer] = current
                elif line.get("status"):
                    ctx.ui.log(f"{layer + ': ' if layer else ''}{line['status']}")
                    if layers is not None and layer and line["status"] == "Pushed":
                        layers[layer] = "pushed"
                    elif layers is not None and layer and (line["status"] == "Layer already exists"
                                                           or line["status"].startswith("Mounted from ")):
                        layers[layer] = "existing"   # the registry had the blob (in another repository: mounted)
    except PushPullRefused as exc:
        raise RegistryError(f"registry {registry}: the engine could not {verb}: "
                            f"{ctx.ui.redact(exc.message)}") from None
    return aux


def _remote(spec: MethodSpec, registry: str) -> str:
    return f"{registry}/{spec.image_repository}"


@dataclass
class PushResult:
    method: str
    registry: str
    reference: str                 # <registry>/envmgr/<m>:<inputs hash>
    digest: str                    # the manifest digest the registry reported
    image_id: str
    inputs_hash: str
    lock_hash: str
    pushed: str                    # when, ISO 8601 UTC
    signed_by: str | None = None   # the signing key's ID, with --sign
    layers_pushed: int = 0         # layers the engine uploaded ...
    layers_existing: int = 0       # ... and those the registry had already (shared with an earlier push)
    bytes_read: int = 0            # uncompressed bytes of the uploaded layers, as the engine reported them

    def fields(self) -> dict:
        """The result as the JSON event and pushed.json carry it (no signed_by when unsigned)."""
        found = asdict(self)
        if self.signed_by is None:
            del found["signed_by"]
        return found


@dataclass
class PullResult:
    method: str
    registry: str
    reference: str                 # the registry's name for the image (removed again after tagging)
    tag: str                       # envmgr's tag for it
    image_id: str
    digest: str | None             # the registry's manifest digest, when the engine reports one
    inputs_hash: str
    lock_hash: str
    signature: dict                # signing.SignatureCheck.as_dict(): state, key_id

    def fields(self) -> dict:
        """The result as the JSON event carries it."""
        return asdict(self)


def push(ctx: Context, method: str, registry: str, sign: Path | None = None) -> PushResult:
    registry = _check_registry(registry)
    wanted, image_id = require_image(ctx, method)
    spec, data, digest, tag = wanted.spec, wanted.inputs, wanted.digest, wanted.tag
    remote, short = _remote(spec, registry), tag.rsplit(":", 1)[1]
    size = (ctx.engine.inspect_image(image_id) or {}).get("Size", 0)
    ctx.engine.tag(image_id, remote, short)
    try:
        auth = credentials(ctx, registry)
        layers: dict[str, str] = {}
        read: dict[str, int] = {}
        aux = _stream(ctx, lambda: ctx.engine.push(remote, short, auth), "push", registry, size, layers, read)
    finally:
        ctx.engine.remove_image(f"{remote}:{short}")  # only the extra tag: the image keeps its own
    digest_pushed = aux.get("Digest")
    if not digest_pushed:
        raise RegistryError(f"registry {registry} did not report a digest for {remote}:{short}")
    result = PushResult(spec.name, registry, f"{remote}:{short}", digest_pushed, image_id, digest, data["lock"],
                        pushed=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                        layers_pushed=sum(v == "pushed" for v in layers.values()),
                        layers_existing=sum(v == "existing" for v in layers.values()),
                        bytes_read=sum(read.values()))
    if sign is not None:
        result.signed_by = _push_signature(ctx, spec, registry, remote, short, image_id, tag, digest, sign)
    _record_push(ctx.cache_dir / PUSHED_FILE, result.fields())
    return result


def _push_signature(ctx: Context, spec: MethodSpec, registry: str, remote: str, short: str, image_id: str,
                    tag: str, digest: str, key_path: Path) -> str:
    """Sign what was pushed and push the signature beside it as `<remote>:<short>.sig`."""
    import tempfile

    from envmgr.ship import signing, trust

    key = signing.load_private_key(key_path)
    layers = ((ctx.engine.inspect_image(image_id) or {}).get("RootFS") or {}).get("Layers") or []
    statement = trust.image_statement(spec.name, tag, image_id, digest, layers)
    sig_tag = trust.signature_tag(short)
    with tempfile.TemporaryDirectory(dir=ctx.cache_dir) as folder:
        archive = trust.signature_image_archive(statement, signing.sign(statement, key), f"{remote}:{sig_tag}",
                                                Path(folder))
    ctx.engine.load_archive(iter([archive]))
    try:
        auth = credentials(ctx, registry)
        _stream(ctx, lambda: ctx.engine.push(remote, sig_tag, auth),
                "push", registry, len(archive))
    finally:
        ctx.engine.remove_image(f"{remote}:{sig_tag}")
    return signing.key_id(key.public_key())


def _pull_signature(ctx: Context, registry: str, remote: str, short: str, auth: dict | None
                    ) -> tuple[bytes, bytes | None]:
    """(statement, signature) pushed beside the image; (b"", None) when the registry has none."""
    from envmgr.ship import trust

    sig_tag = trust.signature_tag(short)
    try:
        _stream(ctx, lambda: ctx.engine.pull(remote, sig_tag, auth),
                "pull", registry, 0)
    except RegistryError as exc:
        ctx.ui.log(f"no signature at {remote}:{sig_tag}: {exc.message}")
        return b"", None
    try:
        saved = b"".join(ctx.engine.save_image(f"{remote}:{sig_tag}"))
        return trust.read_signature_image(saved)
    finally:
        ctx.engine.remove_image(f"{remote}:{sig_tag}")


def _record_push(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open_lock(path.with_name(path.name + ".lock")) as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        known = json.loads(path.read_text()) if path.is_file() else {}
        known[record["reference"]] = record
        atomic_write(path, json.dumps(known, indent=1, sort_keys=True))


def pull(ctx: Context, method: str, registry: str) -> PullResult:
    registry = _check_registry(registry)
    spec = find_method(method, ctx.config.base_dir)
    get_backend(spec).check(spec)
    base = current_base(ctx, spec.base_image)
    if base is None:
        raise UsageError(f"{spec.name}: no base image {spec.base_image!r} on this server: its ID is part of the "
                         "tag to pull", hint="`envmgr base build`, or `envmgr import` an archive of any method once")
    wanted = target(ctx, spec, base)
    data, digest, tag = wanted.inputs, wanted.digest, wanted.tag
    remote, short = _remote(spec, registry), tag.rsplit(":", 1)[1]
    auth = credentials(ctx, registry)
    from envmgr.ship import trust

    statement, signature = _pull_signature(ctx, registry, remote, short, auth)
    signed = trust.check_signature(ctx, f"{remote}:{short}", statement, signature)   # before the image comes
    _stream(ctx, lambda: ctx.engine.pull(remote, short, auth),
            "pull", registry, 0)
    pulled = ctx.engine.inspect_image(f"{remote}:{short}")
    if pulled is None:
        raise RegistryError(f"registry {registry}: {remote}:{short} did not arrive")
    try:
        labels = (pulled.get("Config") or {}).get("Labels") or {}
        wrong = [key for key, want in ((paths.LABEL_LOCK, data["lock"]), (paths.LABEL_INPUTS, digest),
                                       (paths.LABEL_METHOD, spec.name)) if labels.get(key) != want]
        if wrong:
            raise EnvmgrError(f"{remote}:{short} does not match {spec.name}'s current lock and inputs "
                              f"(label {', '.join(wrong)} differs); it was not tagged {tag}",
                              hint="push it again from a server whose lock is this one")
        if signature is not None:
            trust.check_pulled(statement, pulled, spec.name, tag)
        ctx.engine.tag(pulled["Id"], spec.image_repository, short)
        ctx.engine.tag(pulled["Id"], spec.image_repository, "latest")
    finally:
        ctx.engine.remove_image(f"{remote}:{short}")  # the registry's name; envmgr's tag stays
    if signature is not None:
        trust.record_signature(ctx, pulled["Id"], "image", statement, signature)
    repo_digests = [d for d in pulled.get("RepoDigests", []) if d.startswith(remote + "@")]
    return PullResult(spec.name, registry, f"{remote}:{short}", tag, pulled["Id"],
                      digest=repo_digests[0].split("@", 1)[1] if repo_digests else None, inputs_hash=digest,
                      lock_hash=data["lock"], signature=signed.as_dict())
