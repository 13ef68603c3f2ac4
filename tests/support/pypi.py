"""A real PEP 503 package index on 127.0.0.1 serving wheels that the tests build themselves."""

from __future__ import annotations

import base64
import hashlib
import http.server
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.loopback import LoopbackServer

FIXED_TIME = (2020, 1, 1, 0, 0, 0)


def build_wheel(out_dir: Path, name: str, version: str, requires: list[str] = (), body: str = "",
                extra: dict[str, str | bytes] | None = None) -> Path:
    """A minimal, valid, pure-Python wheel with one module (byte-identical on every call)."""
    module = name.replace("-", "_")
    dist = f"{module}-{version}"
    files = {
        f"{module}/__init__.py": (body or f'VERSION = "{version}"\n').encode(),
        **{path: text if isinstance(text, bytes) else text.encode() for path, text in (extra or {}).items()},
        f"{dist}.dist-info/METADATA": ("Metadata-Version: 2.1\n"
                                       f"Name: {name}\nVersion: {version}\n"
                                       + "".join(f"Requires-Dist: {r}\n" for r in requires)).encode(),
        f"{dist}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: envmgr-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record_lines = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record_lines.append(f"{path},sha256={digest},{len(data)}")
    record_lines.append(f"{dist}.dist-info/RECORD,,")
    files[f"{dist}.dist-info/RECORD"] = ("\n".join(record_lines) + "\n").encode()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for file_name, data in files.items():
            info = zipfile.ZipInfo(file_name, FIXED_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
    return path


@dataclass
class Index(LoopbackServer):
    """Serves every wheel in `root` as /simple/<project>/ with sha256 fragments."""

    root: Path
    username: str | None = None
    password: str | None = None
    sdists: bool = False   # also serve *.tar.gz source distributions
    requests: list[str] = field(default_factory=list)

    def files(self) -> list[Path]:
        found = list(self.root.glob("*.whl"))
        if self.sdists:
            found += list(self.root.glob("*.tar.gz"))
        return sorted(found)

    def start(self) -> "Index":
        index = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_HEAD(self):  # noqa: N802 - resolvers probe files with HEAD before range requests
                self._head_only = True
                try:
                    self.do_GET()
                finally:
                    self._head_only = False

            def _body(self, data: bytes) -> None:
                if not getattr(self, "_head_only", False):
                    self.wfile.write(data)

            def do_GET(self):  # noqa: N802
                index.requests.append(self.path)
                if not index.authorized(self):
                    return
                parts = [p for p in self.path.split("?")[0].split("/") if p]
                if parts == ["simple"]:
                    names = sorted({_project(w.name) for w in index.files()})
                    return self._html("".join(f'<a href="/simple/{n}/">{n}</a>\n' for n in names))
                if len(parts) == 2 and parts[0] == "simple":
                    project = _normalize(parts[1])
                    wheels = [w for w in index.files() if _project(w.name) == project]
                    if not wheels:
                        self.send_response(404)
                        self.end_headers()
                        return
                    links = "".join(f'<a href="/files/{w.name}#sha256={hashlib.sha256(w.read_bytes()).hexdigest()}">'
                                    f"{w.name}</a>\n" for w in wheels)
                    return self._html(links)
                if len(parts) == 2 and parts[0] == "files" and (index.root / parts[1]).is_file():
                    data = (index.root / parts[1]).read_bytes()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/octet-stream")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self._body(data)
                    return
                self.send_response(404)
                self.end_headers()

            def _html(self, body: str):
                data = f"<!DOCTYPE html><html><body>\n{body}</body></html>\n".encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self._body(data)

        self._serve(Handler)
        return self

    @property
    def url(self) -> str:
        return self.auth_url("simple/")


def _normalize(name: str) -> str:
    import re

    return re.sub(r"[-_.]+", "-", name).lower()


def _project(file_name: str) -> str:
    if file_name.endswith(".tar.gz"):
        return _normalize(file_name[: -len(".tar.gz")].rsplit("-", 1)[0])
    return _normalize(file_name.split("-")[0])


