"""A wheel whose extension needs a system library the image lacks: the build names the Debian package with a
ready `[system] apt` line (from the apt mirror's Contents index, here served on 127.0.0.1), and a run that
fails on `cannot open shared object file` names it too."""

from __future__ import annotations

import gzip
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from tests.support.apt_contents import ContentsMirror
from tests.support.pypi import Index, build_wheel

pytestmark = [pytest.mark.engine, pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")]

CONTENTS = "usr/lib/x86_64-linux-gnu/libGL.so.1    libs/libgl1\nusr/bin/true    utils/coreutils\n"


def _gl_wheel(out: Path, work: Path) -> None:
    """envmgr-glneed 1.0: an extension module linked against libGL.so.1 (a stub of that soname, not shipped)."""
    work.mkdir()
    (work / "stub.c").write_text("int glStub(void) { return 1; }\n")
    (work / "ext.c").write_text("int glStub(void); int f(void) { return glStub(); }\n")
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", "libGL.so.1", "-Wl,-soname,libGL.so.1", "stub.c"], cwd=work,
                   check=True)
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", "_gl.so", "ext.c", "-Wl,--no-as-needed", "-L.",
                    "-l:libGL.so.1"], cwd=work, check=True)
    build_wheel(out, "envmgr-glneed", "1.0", body="import ctypes, os\n"
                "ctypes.CDLL(os.path.join(os.path.dirname(__file__), '_gl.so'))\n",
                extra={"envmgr_glneed/_gl.so": (work / "_gl.so").read_bytes()})


def test_a_missing_system_library_is_named_at_build_and_at_run(workspace, tmp_path):
    wheels = tmp_path / "wheels"
    _gl_wheel(wheels, tmp_path / "gcc")
    repo = tmp_path / "repo.zip"
    with zipfile.ZipFile(repo, "w") as zf:
        zf.writestr("glrepo/requirements.txt", "envmgr-glneed==1.0\n")
        zf.writestr("glrepo/train.py", "import envmgr_glneed\n")
    index, apt = Index(wheels).start(), ContentsMirror(gzip.compress(CONTENTS.encode()))
    try:
        mirrors = {"mirror": index.url, "ENVMGR_MIRRORS_APT": f"http://127.0.0.1:{apt.port}/apt-mirror"}
        workspace.envmgr("method", "add", str(repo), "--name", "glneed")
        workspace.envmgr("lock", "glneed", **mirrors)
        built = workspace.envmgr("build", "glneed", **mirrors)
        assert "libGL.so.1 (needed by lib/python3.11/site-packages/envmgr_glneed/_gl.so): Debian package libgl1" \
            in built.stderr, built.stderr
        assert '[system] apt = ["libgl1"]' in built.stderr
        assert apt.requests == ["/apt-mirror/dists/bookworm/main/Contents-amd64.gz"]

        ran = workspace.envmgr("run", "glneed", "--gpus", "none", check=False)
        assert ran.returncode == 1 and "libGL.so.1: cannot open shared object file" in ran.stderr
        assert 'libGL.so.1 is in Debian package libgl1: add `[system] apt = ["libgl1"]`' in ran.stderr, ran.stderr
    finally:
        index.stop()
        apt.stop()
