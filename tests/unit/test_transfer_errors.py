"""Export/import, registry and gc error paths that need no engine."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from envmgr.core.errors import EnvmgrError, UsageError
from envmgr.core.ui import Reporter
from envmgr.gc.gc import LAYER_FILE
from envmgr.images.image import tarinfo
from envmgr.ship.registry import _check_registry
from envmgr.ship.transfer import MANIFEST, ArchiveError, _stage_targets, verify_members, write_atomically


class _Ctx:
    ui = Reporter("json")


def test_disk_full_during_export_leaves_no_file_under_the_final_name(tmp_path):
    out = tmp_path / "method.envmgr.tar"

    def write(fh):
        fh.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(EnvmgrError, match="disk full") as failed:
        write_atomically(out, write, _Ctx())
    assert "no archive was written" in failed.value.message
    assert list(tmp_path.iterdir()) == []


def test_interrupted_export_leaves_nothing(tmp_path):
    def write(fh):
        fh.write(b"x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(tmp_path / "a.tar", write, _Ctx())
    assert list(tmp_path.iterdir()) == []


def _archive(path: Path, members: dict[str, bytes], listed: dict[str, bytes] | None = None) -> dict:
    listed = members if listed is None else listed
    manifest = {"format": "envmgr-export/1", "members": [
        {"name": n, "part": f"part {n}", "size": len(d), "sha256": hashlib.sha256(d).hexdigest()}
        for n, d in listed.items()]}
    body = json.dumps(manifest).encode()
    with tarfile.open(path, "w") as tar:
        tar.addfile(tarinfo(MANIFEST, tarfile.REGTYPE, 0o644, len(body)), io.BytesIO(body))
        for name, data in members.items():
            tar.addfile(tarinfo(name, tarfile.REGTYPE, 0o644, len(data)), io.BytesIO(data))
    return manifest


def test_every_member_is_checked_against_the_manifest(tmp_path):
    good = {"envmgr/method/main.py": b"print(1)\n", "abc/layer.tar": b"L" * 5000}
    manifest = _archive(tmp_path / "ok.tar", good)
    small = verify_members(tmp_path / "ok.tar", manifest, {}, _Ctx())
    assert small == {"envmgr/method/main.py": b"print(1)\n"}

    manifest = _archive(tmp_path / "flipped.tar", {**good, "abc/layer.tar": b"L" * 2500 + b"M" + b"L" * 2499}, good)
    with pytest.raises(ArchiveError, match="part abc/layer.tar is damaged"):
        verify_members(tmp_path / "flipped.tar", manifest, {}, _Ctx())

    manifest = _archive(tmp_path / "extra.tar", {**good, "evil.sh": b"x"}, good)
    with pytest.raises(ArchiveError, match="unexpected member 'evil.sh'"):
        verify_members(tmp_path / "extra.tar", manifest, {}, _Ctx())

    manifest = _archive(tmp_path / "short.tar", good)
    data = (tmp_path / "short.tar").read_bytes()
    (tmp_path / "short.tar").write_bytes(data[:3000])
    with pytest.raises(ArchiveError, match="truncated"):
        verify_members(tmp_path / "short.tar", manifest, {}, _Ctx())


def test_a_member_that_would_leave_the_method_folder_is_refused(tmp_path):
    manifest = {"members": [{"name": "envmgr/method/../../etc/cron.d/x", "size": 1, "sha256": ""}]}
    with pytest.raises(ArchiveError, match="would leave"):
        _stage_targets(manifest, tmp_path / "m")
    manifest = {"members": [{"name": "envmgr/method/link", "link": "/etc"},
                            {"name": "envmgr/method/link/passwd", "size": 1, "sha256": ""}]}
    with pytest.raises(ArchiveError, match="under a link"):
        _stage_targets(manifest, tmp_path / "n")
    assert not (tmp_path / "n" / "link").is_symlink(), "a link was made before the files were checked"
    targets, links = _stage_targets({"members": [{"name": "envmgr/method/a/b.py", "size": 1, "sha256": ""},
                                                 {"name": "envmgr/method/l", "link": "a/b.py"}]}, tmp_path / "o")
    assert targets == {"envmgr/method/a/b.py": tmp_path / "o" / "a" / "b.py"}
    assert links == [(tmp_path / "o" / "l", "a/b.py")]


def test_registry_names_a_host_not_a_url_with_credentials():
    assert _check_registry("127.0.0.1:5000/") == "127.0.0.1:5000"
    for bad in ("http://127.0.0.1:5000", "user:pw@registry:5000", ""):
        with pytest.raises(UsageError):
            _check_registry(bad)


def test_cached_layer_names_parse_with_hyphenated_methods():
    match = LAYER_FILE.match(f"env-tiny-transfer-{'a' * 32}.tar")
    assert match and match.group(1) == "env" and match.group(2) == "tiny-transfer"
    assert not LAYER_FILE.match("env-tiny.tar")
