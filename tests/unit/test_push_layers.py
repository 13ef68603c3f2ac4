"""What a push reports about each layer, read from the engine's progress records (no engine here)."""

from __future__ import annotations

from envmgr.core.ui import Reporter
from envmgr.ship.registry import _stream


class _Ctx:
    ui = Reporter("json")


def test_push_counts_uploaded_and_already_present_layers():
    lines = [
        {"status": "The push refers to repository [127.0.0.1:5000/envmgr/b]"},
        {"status": "Preparing", "id": "aaa"}, {"status": "Preparing", "id": "bbb"}, {"status": "Preparing", "id": "ccc"},
        {"status": "Mounted from envmgr/a", "id": "aaa"},
        {"status": "Layer already exists", "id": "bbb"},
        {"status": "Pushing", "id": "ccc", "progressDetail": {"current": 512, "total": 2048}},
        {"status": "Pushing", "id": "ccc", "progressDetail": {"current": 2048, "total": 2048}},
        {"status": "Pushed", "id": "ccc"},
        {"aux": {"Tag": "x", "Digest": "sha256:" + "0" * 64, "Size": 1}},
    ]
    layers: dict[str, str] = {}
    read: dict[str, int] = {}
    aux = _stream(_Ctx(), lambda: iter(lines), "push", "127.0.0.1:5000", 4096, layers, read)
    assert aux["Digest"].startswith("sha256:")
    assert layers == {"aaa": "existing", "bbb": "existing", "ccc": "pushed"}
    assert read == {"ccc": 2048}
