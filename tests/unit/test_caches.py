"""Caches counted (`doctor`) and trimmed (`gc`): what current locks name stays, unless --all."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from envmgr.core.config import load_config
from envmgr.core.ui import Reporter
from envmgr.door.context import Context
from envmgr.gc import caches
from envmgr.gc.gc import apply, plan
from envmgr.lock.backends.poetry import POETRY_VERSION, PYPI_MIRROR_PLUGIN_VERSION

ARCHIVE_KEPT, ARCHIVE_OLD, ARCHIVE_LOOSE = "keptArchive00001", "oldArchive000002", "looseArchive0003"
ARCHIVE_URL, ARCHIVE_INDEX = "urlArchive000004", "indexArchive0005"

POETRY_LOCK = """\
[[package]]
name = "Foo_Bar"
version = "1.0"
description = ""
files = [{file = "foo_bar-1.0-py3-none-any.whl", hash = "sha256:00"}]

[[package]]
name = "baz"
version = "2.0"
"""


class _Engine:
    def image_id(self, ref):
        return None

    def containers(self, label=None):
        return []

    def images(self, label=None, all_=False):
        return []

    def inspect_image(self, ref):
        return None


def _ctx(tmp_path: Path) -> Context:
    method = tmp_path / "base" / "methods" / "tiny"
    method.mkdir(parents=True)
    (method / "envmgr.toml").write_text('name = "tiny"\nbackend = "poetry"\nentry = ["python", "main.py"]\n'
                                        'gpu = "none"\n')
    (method / "pyproject.toml").write_text('[project]\nname = "tiny"\nversion = "0"\n')
    (method / "poetry.lock").write_text(POETRY_LOCK)
    config = load_config({"base_dir": str(tmp_path / "base"), "cache_dir": str(tmp_path / "cache")}, files=[])
    return Context(config=config, ui=Reporter("json"), _engine=_Engine())  # type: ignore[arg-type]


def _file(path: Path, size: int = 10, data: bytes | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if data is not None else b"x" * size)
    return path


def _uv(cache: Path) -> Path:
    uv = cache / "uv"
    for archive in (ARCHIVE_KEPT, ARCHIVE_OLD, ARCHIVE_LOOSE, ARCHIVE_URL, ARCHIVE_INDEX):
        _file(uv / "archive-v0" / archive / "pkg" / "__init__.py", 1000)
    kept = uv / "wheels-v7" / "pypi" / "foo-bar"
    _file(kept / "1.0-py3-none-any.http", data=b"\x90pointer " + ARCHIVE_KEPT.encode())
    (kept / "1.0-py3-none-any").symlink_to(f"../../../archive-v0/{ARCHIVE_KEPT}")
    old = uv / "wheels-v7" / "pypi" / "foo-bar"
    _file(old / "0.9-py3-none-any.msgpack", data=b"\x90" + ARCHIVE_OLD.encode())
    (old / "0.9-py3-none-any").symlink_to(f"../../../archive-v0/{ARCHIVE_OLD}")
    mirrored = uv / "wheels-v7" / "index" / "0123456789abcdef" / "baz"    # a mirror's index
    (mirrored.parent).mkdir(parents=True)
    mirrored.mkdir()
    (mirrored / "2.0-py3-none-any").symlink_to(f"../../../../archive-v0/{ARCHIVE_INDEX}")
    url = uv / "wheels-v7" / "url" / "feedface"                                # built from a URL: kept
    url.mkdir(parents=True)
    (url / "any-1.0").symlink_to(f"../../../archive-v0/{ARCHIVE_URL}")
    _file(uv / "simple-v27" / "pypi" / "foo-bar.rkyv")
    return uv


def test_lock_formats_name_their_versions():
    requirements = "foo-bar==1.0 \\\n    --hash=sha256:00\nbaz==2.0 ; python_version >= '3'\n"
    conda = "package:\n- name: greet-data\n  version: '1.0'\n  manager: conda\n"
    assert caches.locked_versions([POETRY_LOCK, requirements, conda]) == {
        ("foo-bar", "1.0"), ("baz", "2.0"), ("greet-data", "1.0")}


def test_gc_keeps_what_current_locks_name_and_removes_the_rest(tmp_path):
    ctx = _ctx(tmp_path)
    uv = _uv(ctx.cache_dir)
    poetry = ctx.cache_dir / "poetry" / "artifacts" / "aa" / "bb" / "cc" / "dd"
    kept_artifact = _file(poetry / "foo_bar-1.0-py3-none-any.whl")
    old_artifact = _file(poetry / "foo_bar-0.9-py3-none-any.whl", 5000)
    old_sdist = _file(poetry / "baz-1.5.tar.gz", 300)
    pkgs = ctx.cache_dir / "conda" / "pkgs"
    _file(pkgs / "baz-2.0-h123_0" / "info" / "index.json")
    _file(pkgs / "baz-1.0-h123_0.conda", 700)
    memo = _file(ctx.cache_dir / "system-libs" / "tiny-x.json")

    result = plan(ctx)
    trims = {item.what.split(":")[0]: item for item in result.remove if item.kind == "cache"}
    assert set(trims) == {"uv", "poetry", "conda"}
    removed = {Path(p) for item in trims.values() for p in item.paths}
    assert removed == {uv / "wheels-v7/pypi/foo-bar/0.9-py3-none-any.msgpack",
                       uv / "wheels-v7/pypi/foo-bar/0.9-py3-none-any",
                       uv / "archive-v0" / ARCHIVE_OLD, uv / "archive-v0" / ARCHIVE_LOOSE,
                       old_artifact, old_sdist, pkgs / "baz-1.0-h123_0.conda"}
    assert trims["uv"].bytes >= 2000 and trims["poetry"].bytes == 5300

    done = apply(ctx, result)
    assert done.freed() >= 2000 + 5300 + 700
    assert not any(p.exists() or p.is_symlink() for p in removed)
    assert (uv / "wheels-v7/pypi/foo-bar/1.0-py3-none-any/pkg/__init__.py").is_file(), "the kept link still works"
    assert (uv / "archive-v0" / ARCHIVE_INDEX).is_dir() and (uv / "archive-v0" / ARCHIVE_URL).is_dir()
    assert kept_artifact.is_file() and memo.is_file() and (uv / "simple-v27/pypi/foo-bar.rkyv").is_file()
    assert not [i for i in plan(ctx).remove if i.kind == "cache"], "a second gc finds nothing more"


def test_gc_all_empties_the_download_caches_and_memos(tmp_path):
    ctx = _ctx(tmp_path)
    uv = _uv(ctx.cache_dir)
    _file(ctx.cache_dir / "poetry" / "cache" / "repositories" / "x.json")
    memo = _file(ctx.cache_dir / "content-hashes.json")
    _file(ctx.cache_dir / "apt-contents" / "sonames-bookworm-amd64-0011.json")
    apply(ctx, plan(ctx, everything=True))
    assert list(uv.iterdir()) == [] and list((ctx.cache_dir / "poetry").iterdir()) == []
    assert not memo.exists() and list((ctx.cache_dir / "apt-contents").iterdir()) == []


def test_gc_with_method_leaves_the_shared_caches(tmp_path):
    ctx = _ctx(tmp_path)
    _uv(ctx.cache_dir)
    assert not [i for i in plan(ctx, methods=["tiny"]).remove if i.kind == "cache"]


def test_nothing_is_trimmed_while_a_step_holds_the_uv_cache(tmp_path):
    import fcntl

    ctx = _ctx(tmp_path)
    _uv(ctx.cache_dir)
    fd = os.open(ctx.cache_dir / "uv.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)      # as backends.common.run_step holds it
        result = plan(ctx)
        assert not [i for i in result.remove if i.kind == "cache"]
        assert any(i.kind == "cache" and "uv cache" in i.why for i in result.keep)
    finally:
        os.close(fd)


def test_superseded_base_rootfs_and_lock_tools_go_the_current_ones_stay(tmp_path):
    ctx = _ctx(tmp_path)
    base = ctx.store_dir / "base" / "trixie-py313"    # a base no method here uses
    current, old = _file(base / "aaaa.tar", 100), _file(base / "bbbb.tar", 4000)
    diff = "c" * 64
    (base / "current.json").write_text(json.dumps({"layer_path": str(current), "diff_id": f"sha256:{diff}"}))
    tools = ctx.store_dir / "tools"
    ours = _file(tools / f"poetry-{POETRY_VERSION}-mirror-{PYPI_MIRROR_PLUGIN_VERSION}-{diff[:12]}" / ".complete")
    older = _file(tools / f"poetry-2.0.0-mirror-0.1.0-{diff[:12]}" / ".complete", 900)
    apply(ctx, plan(ctx, everything=True))
    assert current.is_file() and ours.is_file()
    assert not old.exists() and not older.parent.exists()


def test_doctor_counts_each_cache(tmp_path):
    ctx = _ctx(tmp_path)
    _uv(ctx.cache_dir)
    _file(ctx.cache_dir / "poetry" / "artifacts" / "a" / "b" / "c" / "d" / "x-1.0.tar.gz", 1234)
    _file(ctx.cache_dir / "somebody-elses" / "file", 77)
    _file(ctx.store_dir / "base" / "bookworm-py311" / "a.tar", 500)
    found = {c.name: c for c in caches.usage(ctx)}
    assert found["uv"].bytes >= 5000 and found["poetry"].bytes == 1234
    assert found["somebody-elses"].bytes == 77 and found["store/base"].bytes == 500
    assert "uv" in found["uv"].holds


@pytest.mark.parametrize("name, expected", [("foo_bar-1.0-py3-none-any.whl", ("foo-bar", "1.0")),
                                            ("Baz-2.0.tar.gz", ("baz", "2.0")), ("README", None)])
def test_poetry_artifact_names(name, expected):
    assert caches._dist_file(name) == expected
