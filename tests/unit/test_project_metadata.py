"""Projects whose dependencies only their build backend knows (setup.py, dynamic metadata): detected
without running anything, and their Requires-Dist read from what the box left."""

from __future__ import annotations

import zipfile

import pytest

from envmgr.core.errors import EnvmgrError
from envmgr.lock.backends.source_builds import _requires_dist
from envmgr.lock.methods import detect_backend


def test_a_setup_py_or_dynamic_project_is_a_pip_method_read_by_its_build_backend(tmp_path):
    (tmp_path / "setup.py").write_text("raise SystemExit('never run by detection')\n")
    found = detect_backend(tmp_path, None)
    assert found.backend == "pip" and found.reason.startswith("setup.py (dependencies named by its build backend")

    dynamic = tmp_path / "dynamic"
    dynamic.mkdir()
    (dynamic / "pyproject.toml").write_text('[build-system]\nrequires = ["setuptools"]\n'
                                            '[project]\nname = "x"\nversion = "1"\ndynamic = ["dependencies"]\n')
    assert detect_backend(dynamic, None).backend == "pip"

    static = tmp_path / "static"
    static.mkdir()
    (static / "pyproject.toml").write_text('[project]\nname = "x"\nversion = "1"\ndependencies = ["a"]\n')
    assert detect_backend(static, None).backend == "poetry", "static dependencies stay with poetry"
    (static / "requirements.txt").write_text("a\n")
    (static / "setup.py").write_text("")
    assert detect_backend(static, None).backend == "poetry"


METADATA = ("Metadata-Version: 2.1\nName: t\nVersion: 1\nRequires-Dist: torch>=2.5\n"
            "Requires-Dist: numpy; python_version >= \"3.11\"\nRequires-Dist: pytest; extra == \"test\"\n"
            "Requires-Dist: sphinx ; extra=='docs' and python_version > '3'\n")


def test_requires_dist_without_extras_from_metadata_or_a_wheel(tmp_path):
    info = tmp_path / "meta" / "t-1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(METADATA)
    assert _requires_dist(tmp_path / "meta", "m") == ["torch>=2.5", 'numpy; python_version >= "3.11"']

    wheel_out = tmp_path / "wheel"
    wheel_out.mkdir()
    with zipfile.ZipFile(wheel_out / "t-1-py3-none-any.whl", "w") as zf:
        zf.writestr("t-1.dist-info/METADATA", METADATA)
    assert _requires_dist(wheel_out, "m") == ["torch>=2.5", 'numpy; python_version >= "3.11"']

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EnvmgrError, match="left no metadata"):
        _requires_dist(empty, "m")
