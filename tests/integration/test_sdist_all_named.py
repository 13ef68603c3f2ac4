"""Every package that has only a source distribution is named by one `envmgr lock`, with the lines to allow them.

A real repository (SimpleTuner 3.1.6) pulls three such packages, one of them a dependency of a dependency;
uv stops at the first, so a user met them one `envmgr lock` at a time and had to find each version, and the
pin of the transitive one was refused. Here, from the loopback index: a direct sdist-only requirement, a
wheel that depends on another sdist-only package, and the message's two lines pasted into the spec make the
lock and the build succeed.
"""

from __future__ import annotations

import io
import re
import tarfile
from pathlib import Path

import pytest

from tests.support.pypi import Index, build_wheel

pytestmark = pytest.mark.engine

BACKEND = '''
import base64, hashlib, os, zipfile

NAME, VERSION = {name!r}, {version!r}


def get_requires_for_build_wheel(config_settings=None):
    return []


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    module = NAME.replace("-", "_")
    info = f"{{module}}-{{VERSION}}.dist-info"
    files = {{
        f"{{module}}/__init__.py": f"NAME = {{NAME!r}}\\n".encode(),
        f"{{info}}/METADATA": f"Metadata-Version: 2.1\\nName: {{NAME}}\\nVersion: {{VERSION}}\\n".encode(),
        f"{{info}}/WHEEL": b"Wheel-Version: 1.0\\nGenerator: fixture\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n",
    }}
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{{path}},sha256={{digest}},{{len(data)}}")
    files[f"{{info}}/RECORD"] = ("\\n".join(record + [f"{{info}}/RECORD,,"]) + "\\n").encode()
    name = f"{{module}}-{{VERSION}}-py3-none-any.whl"
    with zipfile.ZipFile(os.path.join(wheel_directory, name), "w") as zf:
        for path, data in files.items():
            zf.writestr(zipfile.ZipInfo(path, (2020, 1, 1, 0, 0, 0)), data)
    return name
'''

SPEC = """\
name = "srcs"
description = "fixture method"
backend = "pip"
entry = ["python", "main.py"]
gpu = "none"
"""


def _sdist(root: Path, name: str, version: str) -> None:
    module = name.replace("-", "_")
    members = {
        f"{module}-{version}/pyproject.toml": b'[build-system]\nrequires = []\nbuild-backend = "fixture_backend"\n'
                                              b'backend-path = ["."]\n',
        f"{module}-{version}/fixture_backend.py": BACKEND.format(name=name, version=version).encode(),
        f"{module}-{version}/PKG-INFO": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
    }
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:gz") as tf:
        for member, body in members.items():
            info = tarfile.TarInfo(member)
            info.size = len(body)
            info.mtime = 1577836800
            tf.addfile(info, io.BytesIO(body))
    (root / f"{module}-{version}.tar.gz").write_bytes(data.getvalue())


def test_one_lock_names_every_sdist_only_package_and_its_lines_make_the_lock(workspace, engine, tmp_path):
    root = tmp_path / "index"
    build_wheel(root, "envmgr-alpha", "1.0", requires=["envmgr-srcdep>=0.1"], body='GREETING = "alpha"\n')
    _sdist(root, "envmgr-srcdirect", "0.3")
    _sdist(root, "envmgr-srcdep", "1.2")
    index = Index(root, sdists=True).start()
    method = workspace.base_dir / "methods" / "srcs"
    method.mkdir(parents=True)
    (method / "envmgr.toml").write_text(SPEC)
    (method / "requirements.txt").write_text("envmgr-srcdirect>=0.1\nenvmgr-alpha==1.0\n")
    (method / "main.py").write_text("import envmgr_alpha, envmgr_srcdep, envmgr_srcdirect\n"
                                    "print('NAMES', envmgr_srcdep.NAME, envmgr_srcdirect.NAME)\n")
    try:
        refused = workspace.envmgr("lock", "srcs", mirror=index.url, check=False)
        said = refused.stderr
        assert refused.returncode != 0, said
        assert re.search(r"envmgr-srcdirect==0\.3, envmgr-srcdep==1\.2 have only a source distribution", said) \
            or re.search(r"envmgr-srcdep==1\.2, envmgr-srcdirect==0\.3 have only a source distribution", said), said
        lines = [line.strip() for line in said.splitlines()
                 if line.strip().startswith(("build_from_source = ", "pin = "))]
        assert len(lines) == 2, said
        assert not (method / "requirements.lock.txt").exists()

        # the two lines, pasted under [adapt] as the message says, and nothing else
        (method / "envmgr.toml").write_text(SPEC + "\n[adapt]\n" + "\n".join(lines) + "\n")
        locked = workspace.envmgr("lock", "srcs", mirror=index.url, check=False)
        assert locked.returncode == 0, locked.stderr
        lock = (method / "requirements.lock.txt").read_text()
        assert "envmgr-srcdirect==0.3" in lock and "envmgr-srcdep==1.2" in lock
        assert "sys_platform" not in lock, lock   # nothing of the probe's overrides is kept
        workspace.envmgr("build", "srcs", mirror=index.url)
        ran = workspace.envmgr("-v", "run", "srcs", "--gpus", "none", mirror=index.url, check=False)
        assert "NAMES envmgr-srcdep envmgr-srcdirect" in ran.stdout + ran.stderr, ran.stderr[-800:]
    finally:
        index.stop()
