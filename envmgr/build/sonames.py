"""System libraries an environment needs and its image lacks, named as the Debian packages that ship them.

After a new image is built, its environment's shared libraries are read in a container of that image
(envmgr/build/elf_needed.py: DT_NEEDED against what the base, the system layer and the environment provide),
and the sonames nothing provides are printed with a ready `[system] apt = [...]` line. Which package ships
a soname comes from the apt mirror's Contents index (`dists/<suite>/main/Contents-<arch>.gz`), reduced to
its library lines and cached; without a reachable index, from a short built-in list of the usual ones.
A run that fails with `libX.so.N: cannot open shared object file` gets the same hint, from the cache or the
built-in list (no network at run time).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import platform
import posixpath
import re
import tarfile
import urllib.request
from pathlib import Path

from envmgr.build import elf_needed
from envmgr.core.errors import EnvmgrError
from envmgr.core.files import atomic_write
from envmgr.core.spec import MethodSpec
from envmgr.door.containers import ContainerSpec
from envmgr.door.context import Context
from envmgr.images.base import BaseImage, load_definition

# when no Contents index is reachable: the libraries wheels most often expect from the system
KNOWN_PACKAGES = {
    "libGL.so.1": "libgl1", "libEGL.so.1": "libegl1", "libOpenGL.so.0": "libopengl0",
    "libglib-2.0.so.0": "libglib2.0-0", "libgthread-2.0.so.0": "libglib2.0-0", "libgobject-2.0.so.0": "libglib2.0-0",
    "libSM.so.6": "libsm6", "libICE.so.6": "libice6", "libXext.so.6": "libxext6", "libXrender.so.1": "libxrender1",
    "libX11.so.6": "libx11-6", "libxcb.so.1": "libxcb1", "libgomp.so.1": "libgomp1",
    "libsndfile.so.1": "libsndfile1", "libaio.so.1": "libaio1", "libnuma.so.1": "libnuma1",
}
MISSING_LINE = "ENVMGR-MISSING "
_LIB_PATH = re.compile(r"^(?:usr/)?lib(?:32|64|x32)?/(?:[^/\s]+-linux-gnu[^/\s]*/)?([^/\s]+\.so[^/\s]*)\s+(\S+)$")
_CANNOT_OPEN = re.compile(r"([A-Za-z0-9_.+-]+\.so(?:\.[0-9]+)*): cannot open shared object file")
_ENV_INPUTS = ("layout", "base", "lock", "installer", "system")   # what the environment and its image's libraries are
_DEBIAN_ARCH = {"amd64": "amd64", "x86_64": "amd64", "arm64": "arm64", "aarch64": "arm64"}


def scan_image(ctx: Context, image_id: str, python: str, prefix: str) -> dict[str, dict[str, list[str]]]:
    """{"needed": soname -> files, "optional": soname -> plugins} for what nothing in the image provides
    (envmgr/build/elf_needed.py says which is which)."""
    lines: list[str] = []
    container = ContainerSpec(image=image_id, command=[python, "-S", "-B", "-c", _scanner_source(), prefix],
                              env={}, mounts=[], workdir="/", user="0:0", network="none",
                              labels={}).hardened()
    result = ctx.engine.run(container, on_line=lines.append)
    found = [line[len(MISSING_LINE):] for line in lines if line.startswith(MISSING_LINE)]
    if result.exit_code != 0 or not found:
        raise EnvmgrError(f"the scan exited {result.exit_code}: {' | '.join(lines[-3:])[:300]}")
    return dict(json.loads(found[-1]))


def _scanner_source() -> str:
    return Path(elf_needed.__file__).read_text()


def index_file(cache_dir: Path, mirror: str, suite: str, arch: str) -> Path:
    """The cached reduction of one Contents index (named by a hash: no mirror URL in a file name)."""
    key = hashlib.sha256(f"{mirror}\0{suite}\0{arch}".encode()).hexdigest()[:16]
    return cache_dir / "apt-contents" / f"sonames-{suite}-{arch}-{key}.json"


def reduce_contents(lines) -> dict[str, str]:
    """A Contents index's lines -> library file name -> the first package that ships it in a library folder."""
    found: dict[str, str] = {}
    for raw in lines:
        line = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        match = _LIB_PATH.match(line.rstrip("\n"))
        if match and match.group(1) not in found:
            found[match.group(1)] = match.group(2).split(",")[0].rsplit("/", 1)[-1]
    return found


def fetch_index(ctx: Context, suite: str, arch: str, timeout: float = 60) -> dict[str, str] | None:
    """The soname -> package map of the apt mirror's Contents index for `suite`, cached; None when unreachable."""
    mirror = ctx.config.mirrors.apt
    if not mirror:
        return None
    cached = index_file(ctx.cache_dir, mirror, suite, arch)
    if cached.is_file():
        try:
            return dict(json.loads(cached.read_text()))
        except (OSError, ValueError):
            pass
    url = f"{mirror.rstrip('/')}/dists/{suite}/main/Contents-{_DEBIAN_ARCH.get(arch, arch)}.gz"
    proxies = {k: v for k, v in (("http", ctx.config.mirrors.http_proxy), ("https", ctx.config.mirrors.https_proxy))
               if v}
    opener = urllib.request.build_opener(urllib.request.ProxyHandler(proxies)) if proxies \
        else urllib.request.build_opener()
    try:
        with opener.open(url, timeout=timeout) as response, gzip.GzipFile(fileobj=response) as lines:
            found = reduce_contents(lines)
    except (OSError, EOFError, ValueError):
        return None     # no index there (or no route to it): the built-in list answers
    atomic_write(cached, json.dumps(found, sort_keys=True))
    return found


def cached_index(cache_dir: Path) -> dict[str, str]:
    """Every Contents reduction cached here, merged (for run-time hints: no network)."""
    merged: dict[str, str] = {}
    for path in sorted((cache_dir / "apt-contents").glob("sonames-*.json")):
        try:
            merged = {**json.loads(path.read_text()), **merged}
        except (OSError, ValueError):
            continue
    return merged


def package_for(soname: str, index: dict[str, str] | None) -> str | None:
    return (index or {}).get(soname) or KNOWN_PACKAGES.get(soname)


def apt_line(packages: list[str]) -> str:
    return "[system] apt = [" + ", ".join(json.dumps(p) for p in sorted(set(packages))) + "]"


def report(ctx: Context, spec_name: str, lacking: dict[str, list[str]], suite: str, arch: str,
           existing: list[str]) -> str | None:
    """Say which sonames the image lacks and the `[system] apt` line that brings them; returns that line."""
    if not lacking:
        return None
    index = fetch_index(ctx, suite, arch)
    named = {soname: package_for(soname, index) for soname in sorted(lacking)}
    source = "the apt mirror's Contents index" if index is not None else "envmgr's built-in list (no Contents index)"
    lines = [f"{spec_name}: the environment needs system libraries the image does not have:"]
    for soname, package in named.items():
        users = lacking[soname]
        who = users[0] + (f" (+{len(users) - 1} more)" if len(users) > 1 else "")
        lines.append(f"  {soname} (needed by {who}): " + (f"Debian package {package}" if package
                                                            else f"no package found in {source}"))
    wanted = [p for p in named.values() if p]
    line = apt_line([*existing, *wanted]) if wanted else None
    if line:
        lines.append(f"  add to envmgr.toml and build again (packages from {source}):\n    {line}")
    ctx.ui.warn("\n".join(lines))
    return line


def runtime_hint(tail: list[str], cache_dir: Path) -> str | None:
    """For a run whose last lines say a shared library could not be opened: the package that ships it."""
    sonames = sorted({m.group(1) for line in tail for m in _CANNOT_OPEN.finditer(line)})
    if not sonames:
        return None
    index = cached_index(cache_dir)
    hints = []
    for soname in sonames:
        package = package_for(soname, index)
        hints.append(f"{soname} is in Debian package {package}: add `[system] apt = [\"{package}\"]` to the spec "
                     "and build again" if package else
                     f"{soname} is not in the image: add the Debian package that ships it to [system] apt")
    return "\n".join(hints)


def lacking_from_records(ctx: Context, spec: MethodSpec, base: BaseImage, image_id: str
                         ) -> dict[str, dict[str, list[str]]] | None:
    """The scan's answer without a container: the image's distributions (its layer-facts label) and their ELF
    facts (the layer store's records: read from the staged trees at install, or from the image when learned),
    the base's and the system layer's library folders (their layer tars). None when a fact is missing (an
    environment of one layer, a record from before the facts were kept, a layer tar not here): then scan."""
    from envmgr.build.layer_facts import ImageFacts
    from envmgr.build.layers import PHYSICAL_PREFIX, store_for
    from envmgr.build.system_layer import system_layer

    facts = ImageFacts.from_labels(((ctx.engine.inspect_image(image_id) or {}).get("Config") or {}).get("Labels"))
    if facts is None or not facts.layers or any(layer.group is None for layer in facts.layers):
        return None
    store = store_for(ctx)
    elf: dict[str, list] = {}
    env_paths: set[str] = set()
    for layer in facts.layers:
        for unit in layer.units:
            record = store.unit_files(unit.key)
            if record is None or not isinstance(record.get("elf"), dict):
                return None
            elf.update(record["elf"])
            env_paths.update(path for path, _digest, _size in record["files"])
    system = system_layer(ctx, spec, base) if spec.system.apt else None
    tars = [Path(base.layer_path), *([system.path] if system is not None else [])]
    if not all(tar.is_file() for tar in tars):
        return None
    image_files = ImageFiles([_tar_index(ctx, tar) for tar in tars])
    root = PHYSICAL_PREFIX

    def exists(path: str) -> bool:
        path = posixpath.normpath(path)
        if path.startswith(root + "/"):
            return path[len(root) + 1:] in env_paths
        return image_files.exists(path)

    needed, optional = elf_needed.decide(root, {k: tuple(v) for k, v in elf.items()},
                                         {path.rsplit("/", 1)[-1] for path in env_paths},
                                         image_files.library_names(), exists)
    return {"needed": needed, "optional": optional}


class ImageFiles:
    """The paths of an image's system layers (base, system packages), symbolic links followed as the loader does."""

    def __init__(self, indexes: list[dict]):
        self.entries: set[str] = set()
        self.links: dict[str, str] = {}
        self.ldconf: list[str] = []
        for index in indexes:
            self.entries.update(index["entries"])
            self.links.update(index["links"])
            self.ldconf += index["ldconf"]

    def resolve(self, path: str) -> str:
        parts = [p for p in path.strip("/").split("/") if p and p != "."]
        done: list[str] = []
        hops = 0
        while parts:
            part = parts.pop(0)
            if part == "..":
                if done:
                    done.pop()
                continue
            here = "/".join([*done, part])
            target = self.links.get(here)
            if target is not None and hops < 40:
                hops += 1
                if target.startswith("/"):
                    done = []
                parts = [p for p in target.split("/") if p and p != "."] + parts
                continue
            done.append(part)
        return "/".join(done)

    def exists(self, path: str) -> bool:
        return self.resolve(path) in self.entries

    def library_names(self) -> set[str]:
        dirs = list(elf_needed.SYSTEM_DIRS)
        for top in ("/lib", "/usr/lib"):
            folder = self.resolve(top)
            dirs += ["/" + entry for entry in self.entries
                     if entry.rsplit("/", 1)[0] == folder and entry.endswith("-linux-gnu")]
        dirs += [line for line in self.ldconf if line.startswith("/")]
        folders = {self.resolve(folder) for folder in dirs}
        return {entry.rsplit("/", 1)[-1] for entry in self.entries if entry.rsplit("/", 1)[0] in folders
                and "/" in entry}


def _tar_index(ctx: Context, tar: Path) -> dict:
    """A layer tar's paths, symbolic links and ld.so.conf.d lines, kept per tar file (content-addressed names)."""
    stat = tar.stat()
    key = hashlib.sha256(f"{tar.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:32]
    memo = ctx.cache_dir / "system-libs" / f"tar-{key}.json"
    try:
        return dict(json.loads(memo.read_text()))
    except (OSError, ValueError):
        pass
    entries: list[str] = []
    links: dict[str, str] = {}
    ldconf: list[str] = []
    with tarfile.open(tar) as archive:
        for member in archive:
            name = posixpath.normpath(member.name.removeprefix("./"))
            name = name.lstrip("/")
            if name in ("", "."):
                continue
            entries.append(name)
            if member.issym():
                links[name] = member.linkname
            elif member.isfile() and name.startswith("etc/ld.so.conf.d/") and name.endswith(".conf"):
                source = archive.extractfile(member)
                if source is not None:
                    ldconf += [line.strip() for line in source.read().decode(errors="replace").splitlines()
                               if line.strip().startswith("/")]
    index = {"entries": sorted(entries), "links": links, "ldconf": ldconf}
    atomic_write(memo, json.dumps(index))
    return index


def check_image(ctx: Context, spec: MethodSpec, base: BaseImage, data: dict[str, str], image_id: str) -> str | None:
    """After a new image: which system libraries its environment lacks, from the records when they have every
    fact, else the scan (remembered per environment: base, lock, installer, system packages); then the
    report. A scan that cannot run is a warning, never a failed build."""
    found = lacking_from_records(ctx, spec, base, image_id)
    if found is not None:
        ctx.ui.log(f"{spec.name}: system libraries checked from the layer records (no scan)")
        return _report_found(ctx, spec, base, found)
    key = hashlib.sha256(json.dumps({"scanner": hashlib.sha256(_scanner_source().encode()).hexdigest(),
                                     "prefix": spec.env_prefix, **{k: data.get(k, "") for k in _ENV_INPUTS}},
                                    sort_keys=True).encode()).hexdigest()[:32]
    memo = ctx.cache_dir / "system-libs" / f"{spec.name}-{key}.json"
    lacking: dict[str, list[str]] | None = None      # soname -> files an extension module's import loads
    if memo.is_file():
        try:
            lacking = dict(json.loads(memo.read_text())["needed"])
        except (OSError, ValueError, KeyError, TypeError):
            lacking = None
    if lacking is None:
        try:
            found = scan_image(ctx, image_id, base.python, spec.env_prefix)
        except EnvmgrError as exc:
            ctx.ui.warn(f"{spec.name}: could not read which system libraries the environment needs ({exc.message})")
            return None
        atomic_write(memo, json.dumps(found, sort_keys=True))
        return _report_found(ctx, spec, base, found)
    return report(ctx, spec.name, lacking, load_definition(base.name).suite, platform.machine(), spec.system.apt)


def _report_found(ctx: Context, spec: MethodSpec, base: BaseImage, found: dict) -> str | None:
    optional = found.get("optional") or {}
    if optional:     # plugins loaded on demand (NVIDIA's nvshmem/cuFile transports, Qt platforms): -v only
        ctx.ui.log(f"{spec.name}: plugins no extension module links need libraries the image lacks (not "
                   "counted): " + "; ".join(f"{name} ({files[0]})" for name, files in sorted(optional.items())))
    return report(ctx, spec.name, dict(found.get("needed") or {}), load_definition(base.name).suite,
                  platform.machine(), spec.system.apt)
