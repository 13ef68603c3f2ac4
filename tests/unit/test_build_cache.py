"""Cached layers: a damaged or half-written entry is never reused."""

from __future__ import annotations

import hashlib

from envmgr.build.target import _cached_layer, _write_record
from envmgr.core.ui import Reporter


class _Ctx:
    ui = Reporter("json")


def test_a_cached_layer_is_reused_only_while_its_bytes_hash_to_its_record(tmp_path):
    tar = tmp_path / "env-m-0.tar"
    tar.write_bytes(b"layer bytes" * 1000)
    diff_id = "sha256:" + hashlib.sha256(tar.read_bytes()).hexdigest()
    record = tmp_path / "env-m-0.json"
    _write_record(record, diff_id, tar.stat().st_size, tar)
    assert _cached_layer(_Ctx(), record, tar).diff_id == diff_id

    damaged = bytearray(tar.read_bytes())
    damaged[5000] ^= 1
    tar.write_bytes(bytes(damaged))           # same size, other bytes
    assert _cached_layer(_Ctx(), record, tar) is None

    record.write_text('{"diff_id": "sha256:')  # a record cut short (an old build killed mid-write)
    assert _cached_layer(_Ctx(), record, tar) is None
    assert not list(tmp_path.glob("*.partial"))
