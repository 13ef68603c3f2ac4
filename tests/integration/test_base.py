"""Base images from the apt mirror: same package versions give the same rootfs bytes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from envmgr.core.config import load_config

pytestmark = pytest.mark.engine
REPO = Path(__file__).resolve().parents[2]


def test_two_base_builds_give_the_same_rootfs_and_image_and_name_no_mirror(store, engine, tmp_path):
    first = json.loads((store / "base" / "bookworm-py311" / "current.json").read_text())
    other_store = tmp_path / "store"
    proc = subprocess.run([sys.executable, "-m", "envmgr", "--json", "base", "build"], capture_output=True,
                          text=True, cwd=REPO, timeout=900,
                          env={**os.environ, "ENVMGR_STORE_DIR": str(other_store),
                               "ENVMGR_CACHE_DIR": str(tmp_path / "cache"), "ENVMGR_CONFIG": "/dev/null"})
    assert proc.returncode == 0, proc.stderr
    second = json.loads((other_store / "base" / "bookworm-py311" / "current.json").read_text())
    if second["packages"] != first["packages"]:
        pytest.skip("the apt mirror moved on between the two builds: package versions differ")
    assert second["diff_id"] == first["diff_id"]
    assert second["image_id"] == first["image_id"]
    mirror = load_config().mirrors.apt or "no-mirror"
    host = mirror.split("//", 1)[-1].split("/", 1)[0]
    with tarfile.open(second["layer_path"]) as tar:
        sources = tar.extractfile("etc/apt/sources.list").read().decode()
        assert host not in sources
        assert not [n for n in tar.getnames() if n.startswith("var/lib/apt/lists/") and n.endswith("Packages")]
    out = engine.containers.run(second["image_id"], ["python3.11", "-c", "import ssl, json; print('ok')"],
                                remove=True, network_mode="none")
    assert out.decode().strip() == "ok"


def test_a_new_store_takes_the_base_from_the_engine_without_debootstrap(store, engine, tmp_path):
    """Issue 26: a second cache (another base dir, a fresh server after an import) learns the base image the
    engine holds instead of running debootstrap again: the same record, the layer saved and checked."""
    first = json.loads((store / "base" / "bookworm-py311" / "current.json").read_text())
    other_store = tmp_path / "store"
    script = ("import envmgr.images.base as b\n"
              "def refuse(*a):\n    raise SystemExit('debootstrap ran')\n"
              "b.build_base = refuse\n"
              "from envmgr.core.config import load_config\nfrom envmgr.core.ui import Reporter\n"
              "from envmgr.door.context import Context\n"
              "print(b.ensure_base(Context(load_config(files=[]), Reporter('plain')), 'bookworm-py311').image_id)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "ENVMGR_STORE_DIR": str(other_store),
                               "ENVMGR_CACHE_DIR": str(tmp_path / "cache"), "ENVMGR_CONFIG": "/dev/null"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == first["image_id"]
    assert "taken from the engine" in proc.stderr
    second = json.loads((other_store / "base" / "bookworm-py311" / "current.json").read_text())
    assert {k: v for k, v in second.items() if k != "layer_path"} == {k: v for k, v in first.items()
                                                                      if k != "layer_path"}
    assert Path(second["layer_path"]).read_bytes() == Path(first["layer_path"]).read_bytes()
