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

from envmgr.build.target import target
from envmgr.core import paths
from envmgr.core.errors import EnvmgrError, UsageError
from envmgr.core.spec import MethodSpec, find_method
from envmgr.door.containers import ContainerSpec
from envmgr.door.context import Context
from envmgr.lock.backends import get_backend
from envmgr.ship.trust import signature_report

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


def image_in_use(ctx: Context, spec: MethodSpec, tag: str) -> tuple[str, str]:
    for ref in (tag, f"{spec.image_repository}:latest"):
        found = ctx.engine.image_id(ref)
        if found:
            return ref, found
    raise UsageError(f"{spec.name}: no image to verify ({tag} is not in the engine)",
                     hint=f"`envmgr build {spec.name}` or `envmgr import` it first")


def rebuild_id(ctx: Context, spec: MethodSpec, scratch_root: Path | None = None) -> str:
    """The image ID the inputs give when every layer is made again in a scratch cache."""
    wanted = target(ctx, spec)
    root = scratch_root or ctx.cache_dir
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="verify-", dir=root))
    try:
        config = dataclasses.replace(ctx.config, cache_dir=scratch)
        # a scratch cache, but the same engine, output and store (base rootfs, lock tools)
        scratch_ctx = dataclasses.replace(ctx, config=config, store=ctx.store_dir)
        ctx.ui.step(f"making {spec.name} again from its inputs in a scratch cache ({scratch})")
        return wanted.config(scratch_ctx).image_id()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def check_records(ctx: Context, spec: MethodSpec, image_id: str) -> dict:
    lines: list[str] = []
    container = ContainerSpec(image=image_id, command=[f"{spec.env_prefix}/bin/python", "-c", RECORD_SCRIPT],
                              env={"HOME": "/tmp"}, network="none", user=f"{os.getuid()}:{os.getgid()}",
                              labels={paths.LABEL_METHOD: spec.name, paths.LABEL_KIND: "verify"})
    with ctx.ui.progress(f"checking {spec.name}'s installed files against their RECORDs", total=1,
                         unit="steps") as task:
        code = ctx.engine.run(container, on_line=lines.append).exit_code
        task.advance(1)
    found = [line for line in lines if line.startswith("ENVMGR-RECORDS ")]
    if code != 0 or not found:
        raise EnvmgrError(f"{spec.name}: could not check the installed files (exit {code}): "
                          f"{ctx.ui.redact(' | '.join(lines[-3:]))}")
    return json.loads(found[-1].split(" ", 1)[1])


@dataclass
class VerifyResult:
    method: str
    tag: str
    in_use: str                    # the ID of the image the method uses
    in_use_ref: str                # the name it was found under
    packages: int
    files: int
    bad_files: list[list[str]]     # [distribution, path, "missing" | "changed"]
    rebuilt: str | None = None     # the ID its inputs make, when it was made again
    image_matches: bool | None = None
    signature: dict = dataclasses.field(default_factory=dict)   # trust.signature_report: checked again now

    @property
    def files_match(self) -> bool:
        return not self.bad_files

    @property
    def ok(self) -> bool:
        return self.files_match and self.image_matches is not False and self.signature.get("ok", True)

    def fields(self) -> dict:
        """The result as the JSON event carries it (no rebuild keys when nothing was made again)."""
        found = dataclasses.asdict(self)
        if self.rebuilt is None:
            del found["rebuilt"], found["image_matches"]
        return {**found, "files_match": self.files_match, "ok": self.ok}

    def report(self) -> list[str]:
        """What a person reads: the image comparison, the file count, the first files that differ."""
        lines = []
        if self.rebuilt is not None:
            lines.append(f"image: {'same' if self.image_matches else 'DIFFERENT'} — in use {self.in_use[:19]}, "
                         f"rebuilt {self.rebuilt[:19]}")
        lines.append(f"files: {self.files} files of {self.packages} packages checked, "
                     f"{len(self.bad_files)} differ from their RECORD")
        lines += [f"  {state}: {path} ({dist})" for dist, path, state in self.bad_files[:20]]
        if self.signature:
            lines.append(f"signature: {self.signature['describe']}")
        return lines

    def failure(self) -> str:
        """The one line for a failed verification."""
        why = [x for x in ("image ID differs" if self.image_matches is False else "",
                           f"{len(self.bad_files)} files differ" if self.bad_files else "",
                           "signature: " + self.signature["describe"] if not self.signature.get("ok", True)
                           else "") if x]
        return f"{self.method}: verification failed: " + ", ".join(why)


def verify(ctx: Context, method: str, rebuild: bool = True) -> VerifyResult:
    spec = find_method(method, ctx.config.base_dir)
    get_backend(spec).check(spec)
    tag = target(ctx, spec).tag
    ref, in_use = image_in_use(ctx, spec, tag)
    rebuilt = rebuild_id(ctx, spec) if rebuild else None
    records = check_records(ctx, spec, in_use)
    layers = ((ctx.engine.inspect_image(in_use) or {}).get("RootFS") or {}).get("Layers") or []
    return VerifyResult(method=spec.name, tag=tag, in_use=in_use, in_use_ref=ref, packages=records["dists"],
                        files=records["files"], bad_files=records["bad"], rebuilt=rebuilt,
                        image_matches=None if rebuilt is None else rebuilt == in_use,
                        signature=signature_report(ctx, in_use, layers))
