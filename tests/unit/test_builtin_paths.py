"""Where envmgr finds its built-in methods and base images: an installed wheel's package data, or the
checkout it runs from; never a folder that merely sits beside the package (site-packages/envs)."""

from __future__ import annotations

import json
from pathlib import Path

from envmgr.core import paths, version

REPO = Path(__file__).resolve().parents[2]


def _layout(monkeypatch, package: Path) -> None:
    package.mkdir(parents=True, exist_ok=True)
    monkeypatch.setattr(paths, "PACKAGE_DIR", package)
    monkeypatch.setattr(paths, "BUILTIN_PACKAGE_DATA", package / "_builtin")
    monkeypatch.setattr(version, "BUILD_INFO", package / "_build.json")


def test_an_installed_wheel_reads_its_package_data(tmp_path, monkeypatch):
    _layout(monkeypatch, tmp_path / "site-packages" / "envmgr")
    (tmp_path / "site-packages" / "envmgr" / "_builtin" / "envs" / "m").mkdir(parents=True)
    assert paths.builtin_dir("envs") == tmp_path / "site-packages" / "envmgr" / "_builtin" / "envs"
    assert paths.builtin_origin("envs").startswith("installed package data: ")


def test_a_folder_beside_the_installed_package_is_not_taken_for_the_builtin_methods(tmp_path, monkeypatch):
    site = tmp_path / "site-packages"
    _layout(monkeypatch, site / "envmgr")
    (site / "envs" / "someone-elses").mkdir(parents=True)     # another distribution's top-level folder
    (site / "pyproject.toml").write_text('[project]\nname = "other"\n')
    assert not paths.builtin_dir("envs").is_dir()
    assert paths.builtin_origin("envs").startswith("none: ")


def test_a_checkout_reads_its_top_level_folders(tmp_path, monkeypatch):
    _layout(monkeypatch, tmp_path / "repo" / "envmgr")
    (tmp_path / "repo" / "images" / "b").mkdir(parents=True)
    (tmp_path / "repo" / "pyproject.toml").write_text('[project]\nname = "envmgr"\n')
    assert paths.builtin_dir("images") == tmp_path / "repo" / "images"
    assert paths.builtin_origin("images") == f"checkout: {tmp_path / 'repo' / 'images'}"
    # and this repository's own tests run from the checkout
    assert paths.BUILTIN_METHODS_DIR == REPO / "envs" and paths.BASE_IMAGES_DIR == REPO / "images"


def test_version_names_the_commit_the_wheel_recorded(tmp_path, monkeypatch):
    _layout(monkeypatch, tmp_path / "site-packages" / "envmgr")
    assert version.describe().endswith("(commit unknown)")
    version.BUILD_INFO.write_text(json.dumps({"commit": "0123456789abcdef" * 2 + "01234567", "dirty": True}))
    assert version.describe() == f"envmgr {version.__version__} (commit 0123456789ab+modified)"
