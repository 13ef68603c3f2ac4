"""sd-demo's `cu128` variant (torch 2.10.0 with 15 `nvidia-*-cu12` wheels, each shipping `nvidia/__init__.py`)
builds, and its figures are printed (run with -s): wall time, image size, layer count.

The uv cache and the layer store live in ENVMGR_TEST_CACHE (default /var/tmp/envmgr-test-cache, shared with
sd-demo's integration test) so a second run downloads nothing; the image is removed at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("ENVMGR_TEST_CACHE", "/var/tmp/envmgr-test-cache"))


@pytest.fixture
def variant_env(store, tmp_path):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("ENVMGR_")},
           "ENVMGR_BASE_DIR": str(tmp_path / "base"), "ENVMGR_CACHE_DIR": str(CACHE),
           "ENVMGR_STORE_DIR": str(store), "ENVMGR_CONFIG": "/dev/null"}
    return env


def test_cu128_variant_builds_with_one_copy_of_the_shared_nvidia_init(variant_env, engine):
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "envmgr", "--json", "build", "sd-demo", "--variant", "cu128"],
                          env=variant_env, capture_output=True, text=True, cwd=REPO, timeout=7200)
    wall = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    done = [json.loads(line) for line in proc.stdout.splitlines() if '"event": "done"' in line][-1]
    image = engine.images.get(done["tag"])
    try:
        layers = image.attrs["RootFS"]["Layers"]
        out = engine.containers.run(done["tag"], ["python", "-c", (
            "import glob, os, sys, torch, nvidia\n"
            "site = os.path.dirname(os.path.dirname(nvidia.__file__))\n"
            "print(torch.__version__, torch.version.cuda, len(glob.glob(site + '/nvidia_*_cu12*.dist-info')))")],
            remove=True, network_mode="none")
        version, cuda, wheels = out.decode().split()
        assert version.startswith("2.10.0") and cuda.startswith("12.8"), out
        assert int(wheels) >= 10, out
        assert "file(s) installed by more than one distribution: each in one layer" in proc.stdout
        print(f"\nsd-demo cu128: built in {wall:.0f} s, image {image.attrs['Size'] / 1e9:.2f} GB, "
              f"{len(layers)} layers ({len(layers) - 2} environment layers), torch {version} CUDA {cuda}, "
              f"{wheels} nvidia-*-cu12 distributions")
    finally:
        engine.images.remove(image.id, force=True)
