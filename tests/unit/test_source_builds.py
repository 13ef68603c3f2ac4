"""Wheels only, and the pieces of the box that builds an allowed sdist (no engine here)."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from envmgr.core.errors import EnvmgrError, UsageError
from envmgr.core.spec import Adaptations, MethodSpec
from envmgr.door.steps import SDIST_ONLY, WHEELS_ONLY
from envmgr.lock.backends import source_builds
from envmgr.lock.backends.poetry import _refuse_sdist_only
from tests.support.pypi import Index


def _sdist(path: Path, files: dict[str, bytes]) -> Path:
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:gz") as tf:
        for name, body in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tf.addfile(info, io.BytesIO(body))
    path.write_bytes(data.getvalue())
    return path


def test_every_step_gets_a_wheels_only_uv_config():
    assert WHEELS_ONLY.is_file()
    assert "no-build = true" in WHEELS_ONLY.read_text()


def test_uvs_no_usable_wheels_names_the_package():
    text = ("error: No solution found when resolving dependencies\n  cause: Because hostile==0.1 has no usable "
            "wheels and you require hostile==0.1, we can conclude that your requirements are unsatisfiable.")
    assert SDIST_ONLY.search(text).group(1) == "hostile"


def test_poetry_lock_with_an_sdist_only_package_is_refused_unless_allowed():
    lock = {"package": [{"name": "wheel-ok", "version": "1", "files": [{"file": "wheel_ok-1-py3-none-any.whl"}]},
                        {"name": "Only-Source", "version": "2", "files": [{"file": "only_source-2.tar.gz"}]}]}
    with pytest.raises(EnvmgrError, match=r"Only-Source==2 has only a source distribution") as raised:
        _refuse_sdist_only(MethodSpec(name="m", entry=["x"]), lock)
    assert 'build_from_source = ["Only-Source"]' in (raised.value.hint or "")
    allowed = MethodSpec(name="m", entry=["x"], adapt=Adaptations(build_from_source=["only_source"]))
    _refuse_sdist_only(allowed, lock)


def test_build_requirements_are_read_without_unpacking(tmp_path):
    in_tree = _sdist(tmp_path / "a-1.tar.gz", {"a-1/pyproject.toml": b'[build-system]\nrequires = []\n'
                                                                      b'build-backend = "backend"\n'})
    assert source_builds.build_requirements(in_tree) == []
    declared = _sdist(tmp_path / "b-1.tar.gz", {"b-1/pyproject.toml": b'[build-system]\nrequires = ["flit_core>=3"]\n'
                                                                       b'build-backend = "flit_core.buildapi"\n',
                                                "b-1/sub/pyproject.toml": b'[build-system]\nrequires = ["no"]\n'})
    assert source_builds.build_requirements(declared) == ["flit_core>=3"]
    legacy = _sdist(tmp_path / "c-1.tar.gz", {"c-1/setup.py": b"raise SystemExit('never run')\n"})
    assert source_builds.build_requirements(legacy) == ["setuptools>=40.8.0", "wheel"]


def test_a_source_build_needs_one_exact_version():
    spec = MethodSpec(name="m", entry=["x"], adapt=Adaptations(build_from_source=["pkg"], pin={"PKG": "2.0"}))
    assert source_builds.exact_version(spec, "pkg", "pkg==1.0\n") == "2.0"
    spec = MethodSpec(name="m", entry=["x"], adapt=Adaptations(build_from_source=["pkg"]))
    assert source_builds.exact_version(spec, "pkg", "other==1\nPkg == 1.5 ; python_version >= '3'\n") == "1.5"
    with pytest.raises(UsageError, match="build_from_source") as raised:
        source_builds.exact_version(spec, "pkg", "pkg>=1\n")
    assert 'pin = { "pkg" = "VERSION" }' in (raised.value.hint or "")


def test_the_lock_records_the_sdists_hash_alone(tmp_path):
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    wheel.write_bytes(b"built")
    built = [source_builds.BuiltWheel("pkg", "1.0", "a" * 64, wheel)]
    lock = ("other==1 \\\n    --hash=sha256:" + "1" * 64 + "\n    # via -r requirements.in\n"
            "pkg==1.0 \\\n    --hash=sha256:" + "2" * 64 + " \\\n    --hash=sha256:" + "3" * 64
            + "\n    # via -r requirements.in\n")
    recorded = source_builds.record_sdist_hashes(lock, built)
    assert "pkg==1.0 \\\n    --hash=sha256:" + "a" * 64 + "\n    # via" in recorded
    assert "2" * 64 not in recorded and "other==1 \\\n    --hash=sha256:" + "1" * 64 in recorded
    with pytest.raises(EnvmgrError):
        source_builds.record_sdist_hashes("other==1 \\\n    --hash=sha256:" + "1" * 64 + "\n", built)


def test_only_a_wheel_of_the_name_and_version_is_taken():
    assert source_builds._is_wheel_of("Pkg_Name-1.0-py3-none-any.whl", "pkg-name", "1.0")
    assert not source_builds._is_wheel_of("pkg_name-1.1-py3-none-any.whl", "pkg-name", "1.0")
    assert not source_builds._is_wheel_of("envmgr_beta-1.1-py3-none-any.whl", "pkg-name", "1.1")
    assert not source_builds._is_wheel_of("pkg_name-1.0.tar.gz", "pkg-name", "1.0")


def test_the_download_step_fetches_the_sdist_with_the_netrc_and_checks_its_hash(tmp_path):
    root = tmp_path / "index"
    root.mkdir()
    sdist = _sdist(root / "pkg_name-1.0.tar.gz", {"pkg_name-1.0/setup.py": b"raise SystemExit\n"})
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    index = Index(root, username="builder", password="pa55", sdists=True).start()
    try:
        script = tmp_path / "fetch.py"
        script.write_text(source_builds.FETCH_SCRIPT)
        netrc = tmp_path / "netrc"
        netrc.write_text("machine 127.0.0.1 login builder password pa55\n")
        os.chmod(netrc, 0o600)
        out = tmp_path / "out"
        out.mkdir()
        env = {"PATH": os.environ["PATH"], "UV_DEFAULT_INDEX": index.url.replace("builder:pa55@", ""),
               "NETRC": str(netrc)}

        def fetch(want: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-I", "-S", str(script), "Pkg.Name", "1.0", want, str(out)],
                                  capture_output=True, text=True, env=env, timeout=60)

        done = fetch("")
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == f"ENVMGR-SDIST pkg_name-1.0.tar.gz {digest}"
        assert (out / "pkg_name-1.0.tar.gz").read_bytes() == sdist.read_bytes()
        assert fetch(digest).returncode == 0
        wrong = fetch("0" * 64)
        assert wrong.returncode != 0 and "does not match" in wrong.stderr
        env.pop("NETRC")
        assert fetch("").returncode != 0   # the index wants the password: the netrc is what carried it
    finally:
        index.stop()


def test_uvs_refusal_gives_the_version_it_saw():
    from envmgr.door.steps import sdist_only_found

    exact = ("  cause: Because atomicwrites==1.4.1 has no usable wheels and only atomicwrites<=1.4.1 is available, "
             "we can conclude that atomicwrites>=1.4.1 cannot be used.")
    assert sdist_only_found(exact) == ("atomicwrites", "1.4.1")
    newest = ("  cause: Because only docopt<=0.6.2 is available and docopt<=0.6.2 has no usable wheels, we can "
              "conclude that all versions of docopt cannot be used.")
    assert sdist_only_found(newest) == ("docopt", "0.6.2")
    assert sdist_only_found("Because pkg has no usable wheels, ...") == ("pkg", "")
    assert sdist_only_found("error: something else") is None


def test_the_sdist_hint_holds_both_lines_whole_with_what_the_spec_already_has():
    from envmgr.door.steps import sdist_only_error

    adapt = Adaptations(build_from_source=["iterutils"], pin={"iterutils": "0.1.6", "torch": "2.5.1"})
    error = sdist_only_error("locking st", {"atomicwrites": "1.4.1", "docopt": "", "iterutils": "0.1.6"}, adapt)
    assert error.message.startswith("locking st: atomicwrites==1.4.1, docopt, iterutils==0.1.6 have only a source")
    lines = [line.strip() for line in error.hint.splitlines()]
    assert 'build_from_source = ["iterutils", "atomicwrites", "docopt"]' in lines
    assert 'pin = { iterutils = "0.1.6", torch = "2.5.1", atomicwrites = "1.4.1", docopt = "VERSION" }' in lines
    assert error.packages == {"atomicwrites": "1.4.1", "docopt": "", "iterutils": "0.1.6"}
    assert "pip index versions" in error.hint   # a version it could not name: where to find one
