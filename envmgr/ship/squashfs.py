"""`envmgr export --format squashfs`: a method's image as an enroot image, for Slurm sites whose nodes
run pyxis/enroot instead of a Docker Engine (`srun --container-image=<file>.sqsh`).

An enroot image is a squashfs of the root filesystem plus two files enroot reads when it starts it:
`/etc/environment` (the image's Env, one KEY=VALUE a line) and `/etc/rc` (the entry: the image's working
dir and command, or the arguments srun gives). The tree comes from envmgr's own layer tars (the ones the
image ID was computed from: checked before use), applied in order with OCI whiteouts.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from envmgr.build.layer_bytes import exported_config, with_layer_files
from envmgr.build.target import require_image
from envmgr.core.errors import EnvmgrError, UsageError
from envmgr.door.context import Context

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"


def export_squashfs(ctx: Context, method: str, out: Path | None = None) -> dict:
    if shutil.which("mksquashfs") is None:
        raise UsageError("mksquashfs not found", hint="apt-get install squashfs-tools")
    wanted, image_id = require_image(ctx, method)
    spec, digest, tag = wanted.spec, wanted.digest, wanted.tag
    config = exported_config(ctx, wanted, image_id)
    image = (ctx.engine.inspect_image(image_id) or {}).get("Config") or {}
    out = out or Path(f"{spec.name}-{digest[:16]}.sqsh")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="envmgr-sqsh-", dir=out.parent) as scratch:
        root = Path(scratch) / "rootfs"
        root.mkdir()
        with with_layer_files(ctx, config, image_id) as full, \
                ctx.ui.progress(f"unpacking {len(config.layers)} layers", total=len(config.layers)) as task:
            for layer in full.layers:
                apply_layer(layer.path, root)
                task.advance(1)
        write_enroot_files(root, image.get("Env") or [], image.get("Entrypoint") or [], image.get("Cmd") or [],
                           image.get("WorkingDir") or "/")
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        ctx.ui.step(f"mksquashfs → {out}")
        proc = subprocess.run(["mksquashfs", str(root), str(tmp), "-noappend", "-no-progress", "-quiet",
                               "-comp", "gzip", "-all-time", "0", "-mkfs-time", "0", "-no-xattrs"],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise EnvmgrError(f"mksquashfs failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
        tmp.replace(out)
    return {"method": spec.name, "file": str(out), "tag": tag, "image_id": image_id, "bytes": out.stat().st_size,
            "format": "squashfs"}


def apply_layer(layer_tar: Path, root: Path) -> None:
    """Extract one layer over `root`: whiteouts delete what lower layers put there."""
    with tarfile.open(layer_tar) as tar:
        members = []
        for member in tar:
            path = PurePosixPath(member.name.lstrip("./") or ".")
            name = path.name
            if name == OPAQUE:
                target = root / path.parent
                if target.is_dir():
                    for child in target.iterdir():
                        _remove(child)
                continue
            if name.startswith(WHITEOUT):
                _remove(root / path.parent / name[len(WHITEOUT):])
                continue
            existing = root / path
            if existing.is_symlink() or (existing.exists() and not (existing.is_dir() and member.isdir())):
                _remove(existing)
            members.append(member)
        tar.extractall(root, members=members, numeric_owner=True, filter="fully_trusted")


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def write_enroot_files(root: Path, env: list[str], entrypoint: list[str], cmd: list[str], workdir: str) -> None:
    etc = root / "etc"
    etc.mkdir(exist_ok=True)
    (etc / "environment").write_text("".join(f"{item}\n" for item in env))
    default = " ".join(shlex.quote(word) for word in entrypoint + cmd) or "/bin/sh"
    prefix = " ".join(shlex.quote(word) for word in entrypoint)
    (etc / "rc").write_text(
        "#!/bin/sh\n"
        "# written by `envmgr export --format squashfs`: enroot runs this as the container's entry\n"
        f"cd {shlex.quote(workdir)} 2>/dev/null || cd /\n"
        'if [ "$#" -gt 0 ]; then\n'
        f'    exec {prefix + " " if prefix else ""}"$@"\n'
        "else\n"
        f"    exec {default}\n"
        "fi\n")
    os.chmod(etc / "rc", 0o755)
    os.chmod(etc / "environment", 0o644)
