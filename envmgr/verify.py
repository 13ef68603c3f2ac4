"""`envmgr verify`: is the image in use the one its inputs make, and are its installed files intact?

1. The image is made again from its inputs in a scratch cache (a fresh uv cache and fresh layers;
   the base rootfs and lock tools come from the store), and its image ID is compared with the ID of
   the image the method uses. Nothing is loaded into the engine: the ID is the sha256 of the config.
2. In a container of the image in use (no network), every file that a package's RECORD lists is
   hashed and compared with the record.
3. The signature recorded when the image was imported or pulled is checked again against the site's
   [trust] keys, and the image ID and layer digests it signs are compared with the engine's.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import paths
from .backends import get_backend
from .build import config_for, target
from .context import Context
from .engine import ContainerSpec
from .errors import EnvmgrError, UsageError
from .spec import MethodSpec, find_method

RECORD_SCRIPT = r"""
import base64, csv, hashlib, json, os, sysconfig
paths = sysconfig.get_paths()
bad, files, dists = [], 0, 0
for site in sorted({paths["purelib"], paths["platlib"]}):
    for entry in sorted(os.listdir(site)) if os.path.isdir(site) else []:
        if not entry.endswith(".dist-info"):
            continue
        record = os.path.join(site, entry, "RECORD")
        if not os.path.isfile(record):
            bad.append([entry, "RECORD", "missing"])
            continue
        dists += 1
        with open(record, newline="") as fh:
            for row in csv.reader(fh):
                if len(row) < 2 or not row[1] or "=" not in row[1]:
                    continue
                algorithm, _, want = row[1].partition("=")
                digest = hashlib.new(algorithm)
                try:
                    with open(os.path.join(site, row[0]), "rb") as f:
                        for chunk in iter(lambda: f.read(1 << 20), b""):
                            digest.update(chunk)
                except FileNotFoundError:
                    bad.append([entry, row[0], "missing"])
                    continue
                files += 1
                if base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode() != want:
                    bad.append([entry, row[0], "changed"])
print("ENVMGR-RECORDS " + json.dumps({"dists": dists, "files": files, "bad": bad}))
"""


@dataclass
class ScratchContext(Context):
    """A context whose cache is a scratch folder but whose store (base rootfs, lock tools) is shared."""

    shared_store: Path = Path(".")

    @property
    def store_dir(self) -> Path:
        return self.shared_store


def image_in_use(ctx: Context, spec: MethodSpec, tag: str) -> tuple[str, str]:
    for ref in (tag, f"{spec.image_repository}:latest"):
        found = ctx.engine.image_id(ref)
        if found:
            return ref, found
    raise UsageError(f"{spec.name}: no image to verify ({tag} is not in the engine)",
                     hint=f"`envmgr build {spec.name}` or `envmgr import` it first")


def rebuild_id(ctx: Context, spec: MethodSpec, scratch_root: Path | None = None) -> str:
    """The image ID the inputs give when every layer is made again in a scratch cache."""
    base, data, digest, _ = target(ctx, spec)
    root = scratch_root or ctx.cache_dir
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="verify-", dir=root))
    try:
        config = dataclasses.replace(ctx.config, cache_dir=scratch)
        scratch_ctx = ScratchContext(config=config, ui=ctx.ui, _engine=ctx._engine, shared_store=ctx.store_dir)
        ctx.ui.step(f"making {spec.name} again from its inputs in a scratch cache ({scratch})")
        return config_for(scratch_ctx, spec, base, data, digest).image_id()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def check_records(ctx: Context, spec: MethodSpec, image_id: str) -> dict:
    lines: list[str] = []
    container = ContainerSpec(image=image_id, command=[f"{spec.env_prefix}/bin/python", "-c", RECORD_SCRIPT],
                              env={"HOME": "/tmp"}, network="none", user=f"{os.getuid()}:{os.getgid()}",
                              labels={paths.LABEL_METHOD: spec.name, paths.LABEL_KIND: "verify"})
    with ctx.ui.progress(f"checking {spec.name}'s installed files against their RECORDs", total=1,
                         unit="steps") as task:
        code = ctx.engine.run(container, on_line=lines.append)
        task.advance(1)
    found = [line for line in lines if line.startswith("ENVMGR-RECORDS ")]
    if code != 0 or not found:
        raise EnvmgrError(f"{spec.name}: could not check the installed files (exit {code}): "
                          f"{ctx.ui.redact(' | '.join(lines[-3:]))}")
    return json.loads(found[-1].split(" ", 1)[1])


def verify(ctx: Context, method: str, rebuild: bool = True) -> dict:
    spec = find_method(method, ctx.config.base_dir)
    get_backend(spec).check(spec)
    _, _, digest, tag = target(ctx, spec)
    ref, in_use = image_in_use(ctx, spec, tag)
    result: dict = {"method": spec.name, "tag": tag, "in_use": in_use, "in_use_ref": ref}
    if rebuild:
        result["rebuilt"] = rebuild_id(ctx, spec)
        result["image_matches"] = result["rebuilt"] == in_use
    records = check_records(ctx, spec, in_use)
    result.update(packages=records["dists"], files=records["files"], bad_files=records["bad"],
                  files_match=not records["bad"])
    result["signature"] = _signature(ctx, in_use)
    result["ok"] = result["files_match"] and result.get("image_matches", True) and result["signature"]["ok"]
    return result


def _signature(ctx: Context, image_id: str) -> dict:
    """The signature recorded when the image was imported or pulled, checked again now."""
    from .trust import signature_report

    layers = ((ctx.engine.inspect_image(image_id) or {}).get("RootFS") or {}).get("Layers") or []
    return signature_report(ctx, image_id, layers)
