"""The base image a method gets follows the Python its repository declares (read, never executed)."""

from __future__ import annotations

import pytest

from envmgr.core.errors import UsageError
from envmgr.images import base
from envmgr.lock.methods import _poetry_python, requires_python


def test_every_base_definition_names_its_python_series():
    series = {d.name: base.python_series(d) for d in base.definitions()}
    assert series["bookworm-py311"] == "3.11" and series["trixie-py313"] == "3.13"
    assert base.definitions()[0].name == base.DEFAULT_BASE


@pytest.mark.parametrize(("wanted", "picked"), [
    (None, "bookworm-py311"), (">=3.8", "bookworm-py311"), (">=3.11,<3.12", "bookworm-py311"),
    (">=3.11.4", "bookworm-py311"), (">=3.12", "trixie-py313"), ("~=3.13.0", "trixie-py313"),
    ("!=3.11.*", "trixie-py313"), (">=3.10, <3.14", "bookworm-py311"),
])
def test_the_default_base_when_it_fits_else_the_oldest_python_that_does(wanted, picked):
    assert base.pick_base(wanted, "repo").name == picked


def test_no_base_fits_is_one_clear_error_that_lists_what_there_is():
    with pytest.raises(UsageError, match=r"repo needs Python >=3\.99, and no base image has one: "
                                         r"bookworm-py311 \(Python 3\.11\), trixie-py313 \(Python 3\.13\)"):
        base.pick_base(">=3.99", "repo")
    with pytest.raises(UsageError, match="not a version specifier"):
        base.pick_base("three point twelve", "repo")


@pytest.mark.parametrize(("poetry", "pep440"), [
    ("^3.12", ">=3.12,<4"), ("~3.10", ">=3.10,<3.11"), (">=3.10,<3.13", ">=3.10,<3.13"), ("3.12.*", "==3.12.*"),
    (">=3.9 || <4", ">=3.9"), ("*", ""),
])
def test_poetry_python_constraints_become_pep440(poetry, pep440):
    assert _poetry_python(poetry) == pep440


def test_requires_python_is_read_from_pyproject_poetry_setup_cfg_or_setup_py_text(tmp_path):
    assert requires_python(tmp_path, {"project": {"requires-python": ">=3.12"}}) == \
        (">=3.12", "pyproject.toml [project] requires-python")
    assert requires_python(tmp_path, {"tool": {"poetry": {"dependencies": {"python": "^3.12"}}}})[0] == ">=3.12,<4"
    (tmp_path / "setup.py").write_text('import os\nos.system("touch /tmp/pwned")\n'
                                       'setup(name="x", python_requires=">=3.12", install_requires=[])\n')
    assert requires_python(tmp_path, {}) == (">=3.12", "setup.py python_requires")
    (tmp_path / "setup.cfg").write_text("[options]\npython_requires = >=3.13\n")
    assert requires_python(tmp_path, {}) == (">=3.13", "setup.cfg python_requires")
    assert requires_python(tmp_path / "nothing", {}) == (None, "")
