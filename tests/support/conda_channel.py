"""A real conda channel for the tests: small packages built here, indexed with py-rattler's indexer,
served over HTTP on 127.0.0.1.

Packages are byte-identical on every build (sorted entries, fixed times, uid 0, fixed compression
levels), so a lock made against one served copy matches any other copy — the committed example
method `envs/conda-demo` is locked against exactly these packages.

Python: no conda-packaged interpreter can be had here, so the `python` package is a venv-style
package that points to the base image's /usr/bin/python3.11 (bin/python symlink + pyvenv.cfg):
the conda env is then a real interpreter prefix that uv installs `pip:` and poetry packages into.
"""

from __future__ import annotations

import asyncio
import bz2
import hashlib
import http.server
import io
import json
import shutil
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.loopback import LoopbackServer

CHANNEL = "envmgr-fixtures"
PLACEHOLDER = "/opt/envmgr-build-placeholder-" + "x" * 40   # replaced by the env prefix at install time
EPOCH = 946684800
ZIP_TIME = (2000, 1, 1, 0, 0, 0)
PYTHON_VERSION = "3.11.2"


@dataclass
class Package:
    name: str
    version: str
    subdir: str                       # linux-64, linux-aarch64 or noarch
    files: dict[str, bytes | str]     # path in the prefix -> content ("->target" for a symlink)
    depends: list[str] = field(default_factory=list)
    fmt: str = ".conda"               # .conda or .tar.bz2
    build_number: int = 0
    has_prefix: tuple[str, ...] = ()  # files whose text holds PLACEHOLDER
    executable: tuple[str, ...] = ()
    noarch: str = "generic"           # for noarch packages: generic or python

    @property
    def build(self) -> str:
        digest = hashlib.sha256((self.name + self.version + self.subdir).encode()).hexdigest()[:8]
        return f"h{digest}_{self.build_number}"

    @property
    def dist(self) -> str:
        return f"{self.name}-{self.version}-{self.build}"


def _tar(entries: list[tuple[str, bytes | str, int]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, content, mode in sorted(entries, key=lambda e: e[0]):
            info = tarfile.TarInfo(name)
            info.mtime = EPOCH
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if isinstance(content, str) and content.startswith("->"):
                info.type = tarfile.SYMTYPE
                info.linkname = content[2:]
                info.mode = 0o777
                tar.addfile(info)
                continue
            data = content.encode() if isinstance(content, str) else content
            info.size = len(data)
            info.mode = mode
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _info_files(pkg: Package) -> dict[str, bytes]:
    paths = []
    for path in sorted(pkg.files):
        content = pkg.files[path]
        if isinstance(content, str) and content.startswith("->"):
            paths.append({"_path": path, "path_type": "softlink", "sha256": hashlib.sha256(b"").hexdigest(),
                          "size_in_bytes": 0})
            continue
        data = content.encode() if isinstance(content, str) else content
        entry = {"_path": path, "path_type": "hardlink", "sha256": hashlib.sha256(data).hexdigest(),
                 "size_in_bytes": len(data)}
        if path in pkg.has_prefix:
            entry.update(file_mode="text", prefix_placeholder=PLACEHOLDER)
        paths.append(entry)
    index = {"name": pkg.name, "version": pkg.version, "build": pkg.build, "build_number": pkg.build_number,
             "depends": pkg.depends, "license": "MIT", "subdir": pkg.subdir, "timestamp": EPOCH * 1000}
    if pkg.subdir == "noarch":
        index["noarch"] = pkg.noarch
    else:
        index["arch"] = {"linux-64": "x86_64", "linux-aarch64": "aarch64"}[pkg.subdir]
        index["platform"] = "linux"
    info = {
        "info/index.json": json.dumps(index, indent=2, sort_keys=True).encode(),
        "info/paths.json": json.dumps({"paths": paths, "paths_version": 1}, indent=2).encode(),
        "info/files": "".join(p + "\n" for p in sorted(pkg.files)).encode(),
        "info/about.json": json.dumps({"summary": f"envmgr test package {pkg.name}"}).encode(),
    }
    if pkg.has_prefix:
        info["info/has_prefix"] = "".join(f"{PLACEHOLDER} text {p}\n" for p in sorted(pkg.has_prefix)).encode()
    return info


def build_package(pkg: Package, out_dir: Path) -> Path:
    """Write `pkg` as a .conda or .tar.bz2 into out_dir/<subdir>/ (same bytes every time)."""
    subdir = out_dir / pkg.subdir
    subdir.mkdir(parents=True, exist_ok=True)
    info = [(name, data, 0o644) for name, data in _info_files(pkg).items()]
    files = [(name, data, 0o755 if name in pkg.executable else 0o644) for name, data in pkg.files.items()]
    path = subdir / (pkg.dist + pkg.fmt)
    if pkg.fmt == ".tar.bz2":
        path.write_bytes(bz2.compress(_tar(info + files), 9))
        return path
    import zstandard

    compressor = zstandard.ZstdCompressor(level=3, write_content_size=True, write_checksum=True)
    members = {
        "metadata.json": json.dumps({"conda_pkg_format_version": 2}).encode(),
        f"info-{pkg.dist}.tar.zst": compressor.compress(_tar(info)),
        f"pkg-{pkg.dist}.tar.zst": compressor.compress(_tar(files)),
    }
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            entry = zipfile.ZipInfo(name, ZIP_TIME)
            entry.external_attr = 0o644 << 16
            zf.writestr(entry, data)
    return path


def python_package(subdir: str) -> Package:
    """A venv-style `python` that points to the base image's interpreter (see the module docstring)."""
    return Package(
        "python", PYTHON_VERSION, subdir, fmt=".conda",
        files={
            "bin/python": "->/usr/bin/python3.11", "bin/python3": "->python", "bin/python3.11": "->python",
            "pyvenv.cfg": f"home = /usr/bin\ninclude-system-site-packages = false\nversion = {PYTHON_VERSION}\n",
            "lib/python3.11/site-packages/README.envmgr": "site-packages of this conda environment\n",
        })


def fixture_packages() -> list[Package]:
    """The test channel: noarch data, a tool per platform with a prefix placeholder and an activation
    script, a package that needs __cuda, one that exists for linux-64 only, and python."""
    packages = [
        Package("greet-data", "1.0", "noarch", fmt=".tar.bz2", has_prefix=("share/greet/message.txt",),
                files={"share/greet/message.txt": f"greetings installed in {PLACEHOLDER}\n"}),
        Package("greet-data", "0.9", "noarch", fmt=".tar.bz2", files={"share/greet/message.txt": "old greetings\n"}),
        Package("greet-py", "1.0", "noarch", fmt=".conda", depends=["python >=3.8"], noarch="python",
                files={"site-packages/greet_py/__init__.py": 'MESSAGE = "greet-py (noarch: python)"\n'}),
        Package("cuda-kernels", "1.0", "linux-64", depends=["__cuda >=12"],
                files={"share/cuda-kernels/README": "needs a CUDA driver\n"}),
        Package("x86-only", "1.0", "linux-64", files={"share/x86-only/README": "linux-64 only\n"}),
        python_package("linux-64"), python_package("linux-aarch64"),
    ]
    for subdir, fmt in (("linux-64", ".conda"), ("linux-aarch64", ".tar.bz2")):
        for version in ("1.0", "1.1"):
            packages.append(Package(
                "hello-tool", version, subdir, fmt=fmt, depends=["greet-data >=1.0"],
                has_prefix=("bin/hello-tool", "etc/conda/activate.d/hello-tool.sh"), executable=("bin/hello-tool",),
                files={
                    "bin/hello-tool": (f"#!/bin/sh\necho \"hello-tool {version} ({subdir}) from {PLACEHOLDER}: "
                                       f"$(cat {PLACEHOLDER}/share/greet/message.txt)\"\n"),
                    "etc/conda/activate.d/hello-tool.sh": f"export HELLO_TOOL_HOME={PLACEHOLDER}/share/greet\n",
                }))
    return packages


def build_example_wheels(root: Path) -> Path:
    """The PyPI packages that the `pip:` sections of the conda tests and envs/conda-demo ask for
    (byte-identical on every build: the committed example lock holds their hashes). envmgr-alpha
    carries a .pth that imports a module at start-up, which must leave no timestamped pyc."""
    from tests.support.pypi import build_wheel

    build_wheel(root, "envmgr-alpha", "1.0", requires=["envmgr-beta>=1.0"],
                body='from envmgr_beta import NAME\nGREETING = "alpha+" + NAME\n',
                extra={"envmgr_alpha_hook.pth": "import envmgr_alpha_hook\n",
                       "envmgr_alpha_hook.py": "HOOKED = 1\n"})
    build_wheel(root, "envmgr-beta", "1.0", body='NAME = "beta-1.0"\n')
    build_wheel(root, "envmgr-beta", "1.1", body='NAME = "beta-1.1"\n')
    return root


def build_channel(root: Path) -> Path:
    """Build and index the test channel under root/<CHANNEL>/ (reused when already complete)."""
    from rattler.index import index_fs

    channel = root / CHANNEL
    marker = channel / ".complete"
    if marker.exists():
        return channel
    shutil.rmtree(channel, ignore_errors=True)
    (channel / "noarch").mkdir(parents=True)
    for pkg in fixture_packages():
        build_package(pkg, channel)
    asyncio.run(index_fs(channel, write_zst=False, write_shards=False))
    marker.touch()
    return channel


@dataclass
class Channel(LoopbackServer):
    """Serves a channel folder at http://127.0.0.1:<port>/<CHANNEL>/ (optionally behind basic auth).

    `corrupt` names files served with flipped bytes (a mirror serving a different file)."""

    root: Path
    username: str | None = None
    password: str | None = None
    requests: list[str] = field(default_factory=list)
    corrupt: set[str] = field(default_factory=set)

    def start(self) -> "Channel":
        channel = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_HEAD(self):  # noqa: N802
                self.do_GET(body=False)

            def do_GET(self, body: bool = True):  # noqa: N802
                channel.requests.append(self.path)
                if not channel.authorized(self):
                    return
                rel = self.path.split("?")[0].lstrip("/")
                path = (channel.root / rel).resolve()
                if not path.is_file() or channel.root.resolve() not in path.parents:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = path.read_bytes()
                if path.name in channel.corrupt:
                    data = data[:-64] + bytes(b ^ 0xFF for b in data[-64:])
                self.send_response(200)
                self.send_header("Content-Type", "application/json" if path.suffix == ".json"
                                 else "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

        self._serve(Handler)
        return self

    @property
    def url(self) -> str:
        return self.auth_url(CHANNEL)
