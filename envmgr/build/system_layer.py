"""System packages: `[system] apt = ["libgl1", ...]` in a spec, as one layer between the base and the environment.

The packages (and whatever they need that the base lacks) are resolved and downloaded by apt in a
container of the base image, through the site's apt mirror (`[mirrors] apt`, inherited from the
host's apt sources), and unpacked with `dpkg-deb -x`; the base's dpkg status gains their stanzas.
No maintainer scripts run, so libraries and tools in the usual paths work, services and alternatives
do not. apt's lists and downloads live in the container's /tmp only: no mirror URL reaches the layer.

apt picks versions from the mirror's state at build time; the layer is cached by (base image,
sorted package list, layout), so a built layer does not move, and its record (and the SBOM) names
the versions installed. With a snapshot mirror the layer is the same on every machine.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import shutil
import tempfile
from pathlib import Path

from envmgr.core import names as names_
from envmgr.core.errors import EnvmgrError, MirrorError
from envmgr.core.files import atomic_write
from envmgr.core.spec import MethodSpec
from envmgr.door.containers import BindMount
from envmgr.door.context import Context
from envmgr.images.base import BaseImage, load_definition
from envmgr.images.image import Layer, write_layer

LAYOUT = "1"
_APT_OUT = "/opt/envmgr/system"
_SOURCES = "/opt/envmgr/apt/sources.list"
_PACKAGE_LINE = re.compile(r"^ENVMGR-DEB (\S+) (\S+) (\S+)$")
# what a slim image does not need (as debuerreotype-slimify does for the base); copyright files stay
_SLIM = ("usr/share/man", "usr/share/info", "usr/share/locale", "usr/share/lintian", "usr/share/doc-base")


def system_key(spec: MethodSpec, base: BaseImage) -> str:
    """What the system layer is cached by: the base image, the sorted package list, the layout."""
    data = {"layout": LAYOUT, "base": base.image_id, "apt": sorted(set(spec.system.apt))}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _record_path(ctx: Context, spec: MethodSpec, base: BaseImage) -> Path:
    return ctx.cache_dir / "layers" / f"system-{system_key(spec, base)[:32]}.json"


def installed(ctx: Context, spec: MethodSpec, base: BaseImage) -> dict[str, str]:
    """name -> version of the packages the method's system layer added (empty when it has none or none is built)."""
    record = _record_path(ctx, spec, base)
    if not spec.system.apt or not record.is_file():
        return {}
    return dict(json.loads(record.read_text()).get("packages", {}))


def system_layer(ctx: Context, spec: MethodSpec, base: BaseImage) -> Layer | None:
    """The method's system packages as a layer (None when its spec names none), cached by `system_key`."""
    if not spec.system.apt:
        return None
    record = _record_path(ctx, spec, base)
    tar = record.with_suffix(".tar")
    if record.is_file() and tar.is_file():
        known = json.loads(record.read_text())
        if tar.stat().st_size == known.get("size"):
            ctx.ui.step(f"system packages layer is cached ({_count(known['packages'])})")
            return Layer(path=tar, diff_id=known["diff_id"], size=known["size"])
    mirror = ctx.config.mirrors.apt
    if not mirror:
        raise MirrorError(f"{spec.name}: [system] apt needs an apt mirror, and neither [mirrors] apt nor the host's "
                          "apt sources name one", hint="set [mirrors] apt in the site config (`envmgr doctor`)")
    suite = load_definition(base.name).suite
    work_root = ctx.cache_dir / "work"
    work_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work_root, prefix=f"system-{spec.name}-") as work:
        out, sources = Path(work) / "out", Path(work) / "sources.list"
        out.mkdir()
        sources.write_text(f"deb {mirror} {suite} main\n")
        packages = _install(ctx, spec, base, out, sources)
        for rel in _SLIM:
            shutil.rmtree(out / rel, ignore_errors=True)
        for doc in (out / "usr/share/doc").glob("*/*"):
            if doc.name != "copyright" and not doc.is_dir():
                doc.unlink()
        trees = [(child, f"/{child.name}") for child in sorted(out.iterdir())]
        layer = write_layer(tar, trees=trees)
    atomic_write(record, json.dumps({"diff_id": layer.diff_id, "size": layer.size, "packages": packages,
                                     "apt": sorted(set(spec.system.apt))}, indent=1, sort_keys=True))
    ctx.ui.step(f"system packages layer: {_count(packages)}, {layer.size / 1e6:.1f} MB")
    return layer


def _install(ctx: Context, spec: MethodSpec, base: BaseImage, out: Path, sources: Path) -> dict[str, str]:
    from envmgr.lock.backends.common import run_step

    apt = ("apt-get -q -o APT::Sandbox::User=root -o Debug::NoLocking=1 -o Dir::State::Lists=/tmp/apt/lists "
           f"-o Dir::Cache=/tmp/apt/cache -o Dir::Etc::SourceList={_SOURCES} -o Dir::Etc::SourceParts=/dev/null "
           "-o Acquire::Retries=3")
    wanted = [names_.check(names_.DEB_PACKAGE, name, "[system] apt package", "a Debian package name")
              for name in sorted(set(spec.system.apt))]
    names = " ".join(wanted)
    script = "\n".join([
        "mkdir -p /tmp/apt/lists/partial /tmp/apt/cache/archives/partial",
        f"{apt} update",
        f"{apt} install -y --no-install-recommends --download-only {' '.join(map(shlex.quote, wanted))}",
        f"mkdir -p {_APT_OUT}/var/lib/dpkg",
        f"cp /var/lib/dpkg/status {_APT_OUT}/var/lib/dpkg/status",
        "for deb in $(ls /tmp/apt/cache/archives/*.deb | LC_ALL=C sort); do",
        f"  dpkg-deb -x \"$deb\" {_APT_OUT}",
        f"  {{ dpkg-deb -f \"$deb\" | awk 'NR==1{{print; print \"Status: install ok installed\"; next}}1'; echo; }} "
        f">> {_APT_OUT}/var/lib/dpkg/status",
        "  echo \"ENVMGR-DEB $(dpkg-deb -f \"$deb\" Package) $(dpkg-deb -f \"$deb\" Version) "
        "$(dpkg-deb -f \"$deb\" Architecture)\"",
        "done",
    ])
    env: dict[str, str] = {"DEBIAN_FRONTEND": "noninteractive"}
    for key in ("http_proxy", "https_proxy", "no_proxy"):
        value = getattr(ctx.config.mirrors, key)
        if value:
            env[key] = value
    with ctx.ui.progress(f"system packages for {spec.name}: {names} (apt, through the site's mirror)",
                         total=1, unit="steps") as task:
        lines = run_step(ctx, base, f"installing {spec.name}'s system packages", script,
                         [BindMount(sources, _SOURCES, read_only=True), BindMount(out, _APT_OUT, read_only=False)],
                         env, method=spec.name)
        task.advance(1)
    packages = {}
    for line in lines:
        match = _PACKAGE_LINE.match(line.strip())
        if match:
            packages[match.group(1)] = match.group(2)
    if not packages:
        raise EnvmgrError(f"{spec.name}: [system] apt = [{names}] added nothing: the base image already has them",
                          hint="remove them from [system] apt")
    return packages


def _count(packages: dict[str, str]) -> str:
    names = sorted(packages)
    shown = ", ".join(f"{name} {packages[name]}" for name in names[:4])
    return f"{len(names)} Debian package{'' if len(names) == 1 else 's'}: {shown}" + (", ..." if len(names) > 4 else "")


def history(spec: MethodSpec) -> str:
    """The image history line of the system layer."""
    return f"envmgr system packages {spec.name}: apt {' '.join(sorted(set(spec.system.apt)))}"

