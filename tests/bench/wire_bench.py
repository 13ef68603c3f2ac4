"""Benchmarks for sharing layers on the wire (issue 14, point 5): pushes and thin exports.

Prints a table and writes bench-results/wire.json. Self-contained: a scratch base dir with two fixture
methods (the tests' `tiny` method under this bench's own names, locked through a loopback PyPI index,
built on the tests' base image in ENVMGR_TEST_STORE), a fresh loopback registry (Debian's docker-registry
on 127.0.0.1), its images removed at the end. Measured in one run on this machine:
  - bytes pushed for method A, then for method B on the same base, then for A's next version (one method
    file changed, same lock): the registry's storage growth (compressed blobs), the layers the engine
    uploaded and those the registry had (goal: the second uploads only its own layers)
  - A's next version exported full and `--thin-for` A's previous image
Run: `make bench` (or `.venv/bin/python -m tests.bench.wire_bench`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from tests.bench.transfer_bench import OUT, REPO

FIRST, SECOND = "wire-bench-a", "wire-bench-b"   # fixture methods of this bench only


def envmgr(env: dict, *args: str) -> tuple[float, dict]:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "envmgr", "--json", *args], cwd=REPO, capture_output=True,
                          text=True, env=env)
    elapsed = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"envmgr {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    done = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"event": "done"')]
    return elapsed, done[-1] if done else {}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_registry(root: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    (root / "data").mkdir(parents=True)
    config = root / "config.yml"
    config.write_text(f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: "
                      f"{root / 'data'}\nhttp:\n  addr: 127.0.0.1:{port}\n")
    proc = subprocess.Popen(["/usr/bin/docker-registry", "serve", str(config)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1)
            return proc, f"127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("docker-registry did not answer within 20 s")


def stored_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in (root / "data").rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default=os.environ.get("TMPDIR", "/var/tmp"))
    args = parser.parse_args()

    import docker

    from tests.integration.conftest import STORE, TINY_MAIN, TINY_PYPROJECT, TINY_SPEC
    from tests.support.pypi import Index, build_wheel

    client = docker.from_env(timeout=3600)
    work = Path(tempfile.mkdtemp(prefix="envmgr-wire-bench-", dir=args.workdir))
    build_wheel(work / "wheels", "envmgr-alpha", "1.0", requires=["envmgr-beta>=1.0"],
                body='from envmgr_beta import NAME\nGREETING = "alpha+" + NAME\n')
    build_wheel(work / "wheels", "envmgr-beta", "1.0", body='NAME = "beta-1.0"\n')
    build_wheel(work / "wheels", "envmgr-gamma", "2.0", body="WINDOWS_ONLY = True\n")
    index = Index(work / "wheels").start()
    env = {**os.environ, "ENVMGR_BASE_DIR": str(work / "base"), "ENVMGR_CACHE_DIR": str(work / "cache"),
           "ENVMGR_STORE_DIR": str(STORE), "ENVMGR_CONFIG": "/dev/null", "ENVMGR_MIRRORS_PYPI": index.url}
    names = (FIRST, SECOND)
    for name in names:
        folder = work / "base" / "methods" / name
        folder.mkdir(parents=True)
        (folder / "envmgr.toml").write_text(TINY_SPEC.replace('name = "tiny"', f'name = "{name}"'))
        (folder / "pyproject.toml").write_text(TINY_PYPROJECT)
        (folder / "main.py").write_text(TINY_MAIN)
    figures: dict = {}
    images: list[str] = []
    proc, registry = start_registry(work / "registry")
    try:
        steps = (("first", FIRST, None), ("second", SECOND, None), ("new_version", FIRST, "print('v2')\n"))
        for key, name, change in steps:
            if change:   # a new version of the method: one method file changed, same lock
                main_py = work / "base" / "methods" / name / "main.py"
                main_py.write_text(main_py.read_text() + change)
            else:
                envmgr(env, "lock", name)
            image = envmgr(env, "build", name)[1]["image"]
            images.append(image)
            before = stored_bytes(work / "registry")
            elapsed, pushed = envmgr(env, "push", name, registry)
            figures[f"push_{key}"] = {"s": elapsed, "registry_grew": stored_bytes(work / "registry") - before,
                                      "image_bytes": client.api.inspect_image(image)["Size"],
                                      "layers_pushed": pushed["layers_pushed"],
                                      "layers_existing": pushed["layers_existing"]}
        full, thin = work / "full.envmgr.tar", work / "thin.envmgr.tar"
        figures["export_full_s"], _ = envmgr(env, "export", FIRST, "-o", str(full))
        figures["export_full_bytes"] = full.stat().st_size
        figures["export_thin_s"], done = envmgr(env, "export", FIRST, "-o", str(thin), "--thin-for", images[0])
        figures["export_thin_bytes"] = thin.stat().st_size
        figures["thin_left_out"] = done.get("left_out", 0)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        index.stop()
        for image in images:
            try:
                client.images.remove(image, force=True)
            except docker.errors.ImageNotFound:
                pass
        shutil.rmtree(work, ignore_errors=True)

    mb = 1e6
    rows = []
    for key, what in (("first", f"push {FIRST} (first)"), ("second", f"push {SECOND} (same base)"),
                      ("new_version", f"push {FIRST} v2 (same base + lock)")):
        f = figures[f"push_{key}"]
        rows.append((what, f"{f['registry_grew'] / mb:.2f} MB", f"image {f['image_bytes'] / mb:.1f} MB; "
                     f"{f['layers_pushed']} layers uploaded, {f['layers_existing']} already there, {f['s']:.1f} s"))
    rows += [
        (f"export {FIRST} v2", f"{figures['export_full_bytes'] / mb:.2f} MB", ""),
        (f"export {FIRST} v2 --thin-for v1", f"{figures['export_thin_bytes'] / mb:.2f} MB",
         f"{figures['thin_left_out']} layers left out"),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>10}  {note}")
    OUT.mkdir(exist_ok=True)
    (OUT / "wire.json").write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
