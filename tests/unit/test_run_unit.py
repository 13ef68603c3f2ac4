"""Run helpers that need no engine."""

import os

from envmgr.runs.plan import content_hash


def test_content_hash_is_remembered_until_a_file_changes(tmp_path):
    model = tmp_path / "model"
    (model / "unet").mkdir(parents=True)
    (model / "unet" / "w.bin").write_bytes(b"a" * 1000)
    (model / "config.json").write_text("{}")
    cache = tmp_path / "cache"
    first = content_hash(model, cache)
    assert first == content_hash(model) and first.startswith("sha256:")
    assert str(model) in (cache / "content-hashes.json").read_text()
    (model / "unet" / "w.bin").write_bytes(b"b" * 1000)
    os.utime(model / "unet" / "w.bin", ns=(1, 1))
    changed = content_hash(model, cache)
    assert changed != first and changed == content_hash(model)
    assert content_hash(model / "config.json") != content_hash(model / "unet" / "w.bin")
