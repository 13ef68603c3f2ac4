"""Benchmarks for moving a method between servers (issue: export/import, push/pull, verify, gc).

Prints a table and writes bench-results/transfer.json. Measured in one run on this machine, on the
sd-demo image (built first when missing: a no-op when it exists):
  - `envmgr export sd-demo` vs `docker save` of the same image through the SDK (goal <= 1.1x)
  - `envmgr import` (every hash checked, then loaded) vs `docker load` of the docker save tar through
    the SDK, both into an engine where the image was removed (goal <= 1.1x)
  - the archive's size vs the docker save tar and vs `gzip -6` of it (conda-pack's default compression);
    with --gzip also `envmgr export --compress gzip` (size and time)
Run: `make bench` (or `.venv/bin/python -m tests.bench.transfer_bench [--gzip] [--method sd-demo]`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "bench-results"


def envmgr(*args: str) -> tuple[float, dict]:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "envmgr", "--json", *args], cwd=REPO, capture_output=True,
                          text=True)
    elapsed = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"envmgr {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    done = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"event": "done"')]
    return elapsed, done[-1] if done else {}


def gzip_size(path: Path) -> int:
    """Size of `gzip -6` of the file, counted from a pipe (nothing more on disk)."""
    with open(path, "rb") as src:
        proc = subprocess.Popen(["gzip", "-6", "-c"], stdin=src, stdout=subprocess.PIPE)
        size = 0
        while chunk := proc.stdout.read(1 << 20):
            size += len(chunk)
        if proc.wait() != 0:
            raise SystemExit("gzip -6 failed")
    return size


def remove_image(client, image_id: str) -> None:
    import docker.errors

    try:
        client.images.remove(image_id, force=True)
    except docker.errors.ImageNotFound:
        pass
    subprocess.run(["sync"], check=False)


def restore(client, image_id: str, tags: list[str]) -> None:
    for full in tags:
        repo, short = full.rsplit(":", 1)
        client.api.tag(image_id, repo, short)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", default="sd-demo")
    parser.add_argument("--gzip", action="store_true", help="also time `envmgr export --compress gzip`")
    parser.add_argument("--workdir", default=os.environ.get("TMPDIR", "/var/tmp"))
    args = parser.parse_args()

    import docker

    client = docker.from_env(timeout=3600)
    _, built = envmgr("build", args.method)
    image_id, tag = built["image"], built["tag"]
    work = Path(tempfile.mkdtemp(prefix="envmgr-transfer-bench-", dir=args.workdir))
    figures: dict = {"method": args.method, "image": image_id, "tag": tag}
    try:
        archive, saved = work / "export.envmgr.tar", work / "docker-save.tar"
        tags = client.images.get(image_id).tags
        # docker save / docker load first, then export / import: one 5 GB copy on disk at a time.
        started = time.monotonic()
        with open(saved, "wb") as fh:
            for chunk in client.api.get_image(image_id, chunk_size=1 << 20):
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        figures["docker_save_s"] = time.monotonic() - started
        figures["docker_save_bytes"] = saved.stat().st_size

        started = time.monotonic()
        figures["gzip6_bytes"] = gzip_size(saved)
        figures["gzip6_s"] = time.monotonic() - started

        remove_image(client, image_id)
        started = time.monotonic()
        with open(saved, "rb") as fh:
            for _ in client.api.load_image(fh):
                pass
        figures["docker_load_s"] = time.monotonic() - started
        saved.unlink()
        restore(client, image_id, tags)

        if args.gzip:
            gz = work / "export.envmgr.tar.gz"
            figures["export_gzip_s"], _ = envmgr("export", args.method, "--compress", "gzip", "-o", str(gz))
            figures["archive_gzip_bytes"] = gz.stat().st_size
            gz.unlink()
        figures["export_s"], _ = envmgr("export", args.method, "-o", str(archive))
        figures["archive_bytes"] = archive.stat().st_size

        remove_image(client, image_id)
        figures["import_s"], imported = envmgr("import", str(archive))
        assert imported.get("image_id") == image_id, imported
        restore(client, image_id, tags)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    figures["export_vs_save"] = figures["export_s"] / figures["docker_save_s"]
    figures["import_vs_load"] = figures["import_s"] / figures["docker_load_s"]
    figures["archive_vs_gzip6"] = figures["archive_bytes"] / figures["gzip6_bytes"]
    gb = 1e9
    rows = [
        ("envmgr export", f"{figures['export_s']:.1f} s", f"{figures['archive_bytes'] / figures['export_s'] / 1e6:.0f} MB/s"),
        ("docker save (SDK)", f"{figures['docker_save_s']:.1f} s",
         f"{figures['docker_save_bytes'] / figures['docker_save_s'] / 1e6:.0f} MB/s"),
        ("  export / save", f"{figures['export_vs_save']:.2f}x", "goal <= 1.1x"),
        ("envmgr import (verify + load)", f"{figures['import_s']:.1f} s",
         f"{figures['archive_bytes'] / figures['import_s'] / 1e6:.0f} MB/s"),
        ("docker load (SDK)", f"{figures['docker_load_s']:.1f} s",
         f"{figures['docker_save_bytes'] / figures['docker_load_s'] / 1e6:.0f} MB/s"),
        ("  import / load", f"{figures['import_vs_load']:.2f}x", "goal <= 1.1x"),
        ("archive size", f"{figures['archive_bytes'] / gb:.2f} GB", ""),
        ("docker save size", f"{figures['docker_save_bytes'] / gb:.2f} GB", ""),
        ("gzip -6 of docker save", f"{figures['gzip6_bytes'] / gb:.2f} GB", f"{figures['gzip6_s']:.0f} s"),
        ("  archive / gzip -6", f"{figures['archive_vs_gzip6']:.2f}x", ""),
    ]
    if "archive_gzip_bytes" in figures:
        rows.append(("envmgr export --compress gzip", f"{figures['archive_gzip_bytes'] / gb:.2f} GB",
                     f"{figures['export_gzip_s']:.0f} s"))
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>10}  {note}")
    OUT.mkdir(exist_ok=True)
    (OUT / "transfer.json").write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
