"""atomic_write: the old contents or the new ones, never half, and no temporary file left behind."""

from __future__ import annotations

import pytest

from envmgr.core.files import atomic_write


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "lock.txt"
    atomic_write(target, "one\n")
    atomic_write(target, b"two\n")
    assert target.read_text() == "two\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["lock.txt"]


def test_a_failed_write_keeps_the_old_contents(tmp_path):
    target = tmp_path / "lock.txt"
    target.write_text("old\n")
    with pytest.raises(TypeError):
        atomic_write(target, None)  # type: ignore[arg-type]
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["lock.txt"]
