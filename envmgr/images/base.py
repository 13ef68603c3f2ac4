"""Base images: a Debian root filesystem with Python, built with debuerreotype through the site's
apt mirror and loaded through the Engine API. Nothing is pulled from a registry.

debuerreotype fixes every timestamp to the archive's own date, so the same package versions give
the same rootfs bytes, and so the same base image ID.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from pydantic import BaseModel, ConfigDict

from envmgr.core import paths
from envmgr.core.errors import EngineError, EnvmgrError, MirrorError, UsageError
from envmgr.core.files import open_lock
from envmgr.core.tomlfile import load_model
from envmgr.door.context import Context
from envmgr.images.image import ImageConfig, Layer, file_layer, save_layers, write_archive

TOOLS = ("debuerreotype-init", "debuerreotype-minimizing-config", "debuerreotype-apt-get",
         "debuerreotype-slimify", "debuerreotype-tar", "debootstrap")


class BaseDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    suite: str = "bookworm"
    packages: list[str]
    python: str = "/usr/bin/python3.11"


@dataclass
class BaseImage:
    name: str
    image_id: str
    diff_id: str
    layer_path: str
    python: str
    python_version: str     # e.g. 3.11.2, for marker evaluation
    packages: dict[str, str]

    @property
    def layer(self):
        path = Path(self.layer_path)
        return Layer(path=path, diff_id=self.diff_id, size=path.stat().st_size)

    @property
    def tag(self) -> str:
        return f"{paths.IMAGE_REPO_PREFIX}base-{self.name}:{self.diff_id.split(':')[1][:16]}"


def load_definition(name: str) -> BaseDefinition:
    path = paths.BASE_IMAGES_DIR / name / "image.toml"
    if not path.is_file():
        known = ", ".join(sorted(p.parent.name for p in paths.BASE_IMAGES_DIR.glob("*/image.toml"))) or "none"
        raise UsageError(f"unknown base image {name!r} (known: {known})")
    return load_model(BaseDefinition, path)


DEFAULT_BASE = "bookworm-py311"


def definitions() -> list[BaseDefinition]:
    """Every base image definition envmgr has (`images/*/image.toml`), the default first."""
    found = [load_definition(p.parent.name) for p in sorted(paths.BASE_IMAGES_DIR.glob("*/image.toml"))]
    return sorted(found, key=lambda d: (d.name != DEFAULT_BASE, d.name))


def python_series(definition: BaseDefinition) -> str:
    """`3.13` for a base whose interpreter is /usr/bin/python3.13."""
    found = re.fullmatch(r"python(\d+\.\d+)", Path(definition.python).name)
    if not found:
        raise UsageError(f"base image {definition.name}: python = {definition.python!r} does not name its "
                         "version (e.g. /usr/bin/python3.13)")
    return found.group(1)


def fits(requires_python: str, series: str) -> bool:
    """Whether a Python `series` (3.13) can satisfy a PEP 440 `requires_python`: some release of it
    does (its .0 or a late patch release), as Debian's patch release is known only once built."""
    try:
        wanted = SpecifierSet(requires_python)
    except InvalidSpecifier:
        raise UsageError(f"requires-python {requires_python!r} is not a version specifier") from None
    return any(wanted.contains(f"{series}.{patch}", prereleases=True) for patch in (0, 99))


def pick_base(requires_python: str | None, where: str) -> BaseDefinition:
    """The base image for a method whose Python must satisfy `requires_python`: the default base when
    it fits, else the fitting one with the oldest Python. Says clearly when none fits."""
    found = definitions()
    if not requires_python:
        return found[0]
    for definition in sorted(found, key=lambda d: (d.name != DEFAULT_BASE, _series_key(python_series(d)))):
        if fits(requires_python, python_series(definition)):
            return definition
    have = ", ".join(f"{d.name} (Python {python_series(d)})" for d in found)
    raise UsageError(f"{where} needs Python {requires_python}, and no base image has one: {have}",
                     hint="add a base image definition under images/ whose Debian suite ships that Python")


def _series_key(series: str) -> tuple[int, ...]:
    return tuple(int(part) for part in series.split("."))


def _state_file(ctx: Context, name: str) -> Path:
    return ctx.store_dir / "base" / name / "current.json"


def current_base(ctx: Context, name: str) -> BaseImage | None:
    state = _state_file(ctx, name)
    if not state.is_file():
        return None
    base = BaseImage(**json.loads(state.read_text()))
    if not Path(base.layer_path).is_file():
        return None
    return base


def ensure_base(ctx: Context, name: str) -> BaseImage:
    """The current base image, built if there is none, reloaded into the engine if it went missing."""
    base = current_base(ctx, name) or adopt_from_engine(ctx, name)
    if base is None:
        ctx.ui.step(f"no base image {name!r} yet: building it (once)")
        return build_base(ctx, name)
    if ctx.engine.image_id(base.tag) != base.image_id:
        _load(ctx, base)
    return base


def adopt_from_engine(ctx: Context, name: str) -> BaseImage | None:
    """A base image envmgr built before (in another cache, or loaded from an archive) that the engine holds,
    made current here without debootstrap: its layer is saved from the engine into the store, checked against
    the image's diff ID, and the image must be exactly the one `_config` makes of that layer with today's
    definition (same image ID: a base built from another definition is not taken). None when the engine holds
    no such image (or cannot say)."""
    definition = load_definition(name)
    try:
        found = ctx.engine.images(label=f"{paths.LABEL_BASE}={name}")
    except EngineError:
        return None
    latest = f"{paths.IMAGE_REPO_PREFIX}base-{name}:latest"
    candidates = sorted(found, key=lambda image: (latest not in (image.get("RepoTags") or []), image["Id"]))
    out_dir = ctx.store_dir / "base" / name
    out_dir.mkdir(parents=True, exist_ok=True)
    with open_lock(out_dir / ".lock") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        already = current_base(ctx, name)     # another process adopted or built it meanwhile
        if already is not None:
            return already
        for image in candidates:
            layers = ((ctx.engine.inspect_image(image["Id"]) or {}).get("RootFS") or {}).get("Layers") or []
            if (image.get("Labels") or {}).get(paths.LABEL_KIND) != "base" or len(layers) != 1:
                continue     # only a one-layer base image is saved (never a method image's gigabytes)
            base = _adopt_image(ctx, definition, image["Id"], layers[0], out_dir)
            if base is not None:
                _state_file(ctx, name).write_text(json.dumps(asdict(base), indent=1, sort_keys=True))
                ctx.ui.step(f"base image {name}: taken from the engine ({base.tag}, python {base.python_version}): "
                            "no debootstrap")
                return base
    return None


def _adopt_image(ctx: Context, definition: BaseDefinition, image_id: str, diff_id: str,
                 out_dir: Path) -> BaseImage | None:
    """The base image `image_id` (its one layer `diff_id`) saved from the engine into `out_dir`, when it is
    envmgr's base for `definition`."""
    try:
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".adopt-") as scratch:
            found = save_layers(ctx.engine.save_image(image_id), {diff_id: None}, Path(scratch))
            if diff_id not in found:
                ctx.ui.log(f"base image {definition.name}: engine image {image_id[:19]} gave no layer {diff_id[:19]}")
                return None
            layer = Layer(path=found[diff_id], diff_id=diff_id, size=found[diff_id].stat().st_size)
            if _config(definition, layer).image_id() != image_id:
                ctx.ui.log(f"base image {definition.name}: engine image {image_id[:19]} is not this definition's")
                return None
            final = out_dir / f"{diff_id.split(':')[1]}.tar"
            os.replace(found[diff_id], final)
    except (EngineError, OSError, tarfile.TarError) as exc:
        ctx.ui.log(f"base image {definition.name}: could not take {image_id[:19]} from the engine: {exc}")
        return None
    with tarfile.open(final) as tar:
        status = tar.extractfile("var/lib/dpkg/status")
        packages = _dpkg_status_versions(status.read().decode(errors="replace") if status else "")
    return BaseImage(name=definition.name, image_id=image_id, diff_id=diff_id, layer_path=str(final),
                     python=definition.python, python_version=_python_version(definition, packages),
                     packages=packages)


def missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def _run(ctx: Context, argv: list[str], step: str, env: dict[str, str]) -> None:
    ctx.ui.log("$ " + " ".join(argv))
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    tail: list[str] = []
    assert proc.stdout
    for line in proc.stdout:
        line = line.rstrip()
        ctx.ui.log(line)
        tail = (tail + [line])[-8:]
    if proc.wait() != 0:
        detail = ctx.ui.redact(" | ".join(tail[-3:]))
        if any(word in detail for word in ("Could not resolve", "Failed to fetch", "Connection refused",
                                           "Release file", "couldn't download")):
            raise MirrorError(f"base image: {step} failed: the apt mirror did not answer: {detail}",
                              hint="check [mirrors] apt in the site config (`envmgr doctor`)")
        raise EnvmgrError(f"base image: {step} failed (exit {proc.returncode}): {detail}")


def build_base(ctx: Context, name: str) -> BaseImage:
    definition = load_definition(name)
    missing = missing_tools()
    if missing:
        raise EnvmgrError(f"building a base image needs {', '.join(missing)}",
                          hint="install them: `sudo apt-get install debuerreotype debootstrap`")
    if os.geteuid() != 0:
        raise UsageError("building a base image needs root (debootstrap creates device nodes and chroots)",
                         hint="run `sudo envmgr base build`")
    mirror = ctx.config.mirrors.apt
    if not mirror:
        raise MirrorError("no apt mirror: the host has no Debian sources for "
                          f"{definition.suite!r} and [mirrors] apt is not set", hint="set [mirrors] apt")
    out_dir = ctx.store_dir / "base" / name
    out_dir.mkdir(parents=True, exist_ok=True)
    with open_lock(out_dir / ".lock") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build_locked(ctx, definition, mirror, out_dir)


def _build_locked(ctx: Context, definition: BaseDefinition, mirror: str, out_dir: Path) -> BaseImage:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    env.update({k: v for k, v in (("http_proxy", ctx.config.mirrors.http_proxy),
                                  ("https_proxy", ctx.config.mirrors.https_proxy)) if v})
    with tempfile.TemporaryDirectory(dir=out_dir, prefix="work-") as work:
        rootfs = Path(work) / "rootfs"
        steps = [
            ("bootstrap", ["debuerreotype-init", "--non-debian", str(rootfs), definition.suite, mirror]),
            ("minimize", ["debuerreotype-minimizing-config", str(rootfs)]),
            ("apt update", ["debuerreotype-apt-get", str(rootfs), "update", "-qq"]),
            ("install packages", ["debuerreotype-apt-get", str(rootfs), "install", "-y", "--no-install-recommends",
                                  *definition.packages]),
            ("slimify", ["debuerreotype-slimify", str(rootfs)]),
        ]
        with ctx.ui.progress(f"base image {definition.name}: debootstrap {definition.suite} + "
                             f"{' '.join(definition.packages)}", total=len(steps) + 1, unit="steps") as task:
            for label, argv in steps:
                task.describe(f"base image {definition.name}: {label}")
                _run(ctx, argv, label, env)
                task.advance(1)
            _scrub(rootfs)
            packages = _dpkg_versions(rootfs)
            tar_tmp = Path(work) / "rootfs.tar"
            _run(ctx, ["debuerreotype-tar", str(rootfs), str(tar_tmp)], "tar", env)
            task.advance(1)
        layer = file_layer(tar_tmp)
        final = out_dir / f"{layer.diff_id.split(':')[1]}.tar"
        os.replace(tar_tmp, final)
        # Everything under rootfs is root-owned device nodes and files: remove it before the temp dir goes.
        shutil.rmtree(rootfs, ignore_errors=True)
    config = _config(definition, file_layer(final))
    base = BaseImage(name=definition.name, image_id=config.image_id(), diff_id=config.layers[0].diff_id,
                     layer_path=str(final), python=definition.python,
                     python_version=_python_version(definition, packages), packages=packages)
    _load(ctx, base)
    _state_file(ctx, definition.name).write_text(json.dumps(asdict(base), indent=1, sort_keys=True))
    ctx.ui.success(f"base image {definition.name}: {base.tag} ({final.stat().st_size / 1e6:.0f} MB, "
                   f"python {base.python_version})", image=base.image_id, tag=base.tag)
    return base


def _scrub(rootfs: Path) -> None:
    """Remove what names the mirror or changes from run to run (sources, indexes, logs, caches)."""
    for rel in ("etc/apt/sources.list", "etc/apt/sources.list.d"):
        target = rootfs / rel
        if target.is_dir():
            for child in target.iterdir():
                child.unlink()
        elif target.exists():
            target.write_text("# envmgr: no apt sources in images; the site's mirror is applied at build time only\n")
    for rel in ("var/lib/apt/lists", "var/cache/apt", "var/log/apt", "var/cache/debconf", "tmp"):
        target = rootfs / rel
        if target.is_dir():
            for child in target.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                elif child.name not in ("lock",):
                    child.unlink()
    for log in ("var/log/dpkg.log", "var/log/alternatives.log", "var/log/bootstrap.log"):
        (rootfs / log).unlink(missing_ok=True)


def _python_version(definition: BaseDefinition, packages: dict[str, str]) -> str:
    """`3.11.2` from the Debian version of the definition's interpreter package ("" when not installed)."""
    python_pkg = Path(definition.python).name
    version = packages.get(python_pkg, packages.get(python_pkg + "-minimal", ""))
    match = re.match(r"(\d+\.\d+\.\d+)", version)
    return match.group(1) if match else ""


def _dpkg_versions(rootfs: Path) -> dict[str, str]:
    return _dpkg_status_versions((rootfs / "var/lib/dpkg/status").read_text(errors="replace"))


def _dpkg_status_versions(text: str) -> dict[str, str]:
    versions: dict[str, str] = {}
    package = None
    for line in text.splitlines():
        if line.startswith("Package: "):
            package = line.split(": ", 1)[1]
        elif line.startswith("Version: ") and package:
            versions[package] = line.split(": ", 1)[1]
    return versions


def _config(definition: BaseDefinition, layer) -> ImageConfig:
    return ImageConfig(
        layers=[layer],
        env={"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"},
        cmd=[definition.python],
        labels={paths.LABEL_KIND: "base", paths.LABEL_BASE: definition.name, paths.LABEL_MANAGED: "true"},
        history=[f"envmgr base build {definition.name}: debuerreotype {definition.suite} + "
                 + " ".join(definition.packages)],
    )


def _load(ctx: Context, base: BaseImage) -> None:
    definition = load_definition(base.name)
    config = _config(definition, base.layer)
    repo, tag = base.tag.rsplit(":", 1)
    with tempfile.TemporaryFile(dir=ctx.store_dir) as archive:
        write_archive(archive, config, [base.tag])
        archive.seek(0)
        ctx.engine.load_archive(archive)
    if ctx.engine.image_id(base.tag) != base.image_id:
        raise EnvmgrError(f"base image {base.name}: the engine reports another image ID than {base.image_id}")
    ctx.engine.tag(base.image_id, repo, "latest")
