"""How fast Engine 20.10 registers an image envmgr wrote: `docker load` against a loopback registry push + pull.

The same layers (incompressible bytes in files of a few MB, as a wheel's libraries are; sizes like
sd-demo's largest layers, scaled by --gb) and the same config, so the same image ID either way:
  - load: pipe (before): the archive written into a pipe the SDK streams, large layers' tars made again
                 from their trees (envmgr's path before issue 26);
  - load: sendfile (now): the same archive as pieces, file contents by sendfile(2) on the engine's socket
                 (build._stream_load now);
  - load/layer:  one archive per layer, bottom first (what loading layers as they are ready costs the engine);
  - load: steps (pipelined): envmgr/build/load_steps.py: chain-prefix images whose archives overlap, the next
                 one's bytes arriving while the engine registers the one before (build._stream_load now,
                 256 MiB steps);
  - push+pull:   each layer pushed uncompressed as a blob to Debian's docker-registry on 127.0.0.1, then
                 `docker pull` through the engine (loopback is insecure-allowed); push and pull timed apart.
Rounds interleaved, the minimum kept; the image and the registry are removed after each. Also the disk's
own figure: writing the same bytes once (with fsync).
Run: `.venv/bin/python -m tests.bench.load_paths_bench [--gb 2] [--rounds 2] [--ways ...]` (part of `make bench`);
`--image envmgr/sd-demo:latest` loads that image's own layers (files as a method has them) over a salt layer.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from tests.bench.transfer_bench import OUT
from tests.bench.wire_bench import start_registry

SHARES = (0.45, 0.2, 0.15, 0.1, 0.05, 0.05)   # of the total: torch, cudnn, cublas, ... then small ones


def make_trees(root: Path, total: int) -> list[Path]:
    trees = []
    for index, share in enumerate(SHARES):
        tree = root / f"tree-{index}"
        left = int(total * share)
        part = 0
        while left > 0:
            size = min(left, (1 + part % 8) << 20)
            folder = tree / "lib" / f"pkg{index}" / f"sub{part % 16}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"f{part}.so").write_bytes(os.urandom(size))
            left -= size
            part += 1
        trees.append(tree)
    return trees


def image_of(trees: list[Path], layers_dir: Path, salt: str, measured: bool = False):
    """A config over one layer per tree (each under a salted folder: a new image ID every round); `measured`:
    hashed, not written (their bytes made again from the trees when sent, as a build's large layers)."""
    from envmgr.images.image import ImageConfig, measure_layer, write_layer

    layers = [measure_layer([(tree, f"/opt/bench-{salt}/{index}")], layers_dir / f"{index}.tar") if measured
              else write_layer(layers_dir / f"{index}.tar", trees=[(tree, f"/opt/bench-{salt}/{index}")])
              for index, tree in enumerate(trees)]
    return ImageConfig(layers=layers, labels={"org.envmgr.bench": "load-paths"},
                       history=[f"layer {i}" for i in range(len(layers))])


def saved_layers(engine, ref: str, folder: Path) -> list:
    """The layers of an image the engine holds (`docker save`, unpacked): a real method's files and sizes."""
    import tarfile

    from envmgr.images.image import Layer

    class Chunks(io.RawIOBase):
        def __init__(self, chunks):
            self.chunks, self.rest = iter(chunks), b""

        def readable(self) -> bool:
            return True

        def readinto(self, buffer) -> int:
            while not self.rest:
                self.rest = next(self.chunks, b"")
                if not self.rest:
                    return 0
            size = min(len(buffer), len(self.rest))
            buffer[:size], self.rest = self.rest[:size], self.rest[size:]
            return size

    folder.mkdir(parents=True)
    with tarfile.open(fileobj=io.BufferedReader(Chunks(engine.save_image(ref)), 1 << 20), mode="r|") as tar:
        tar.extractall(folder, filter="data")
    manifest = json.loads((folder / "manifest.json").read_text())[0]
    diff_ids = json.loads((folder / manifest["Config"]).read_text())["rootfs"]["diff_ids"]
    return [Layer(path=folder / name, diff_id=diff_id, size=(folder / name).stat().st_size)
            for name, diff_id in zip(manifest["Layers"], diff_ids, strict=True)]


def salted_image(saved: list, layers_dir: Path, salt: str):
    """The saved layers over a salt layer of one small file: every chain is new to the engine."""
    from envmgr.images.image import ExtraFile, ImageConfig, write_layer

    layers_dir.mkdir(parents=True, exist_ok=True)
    bottom = write_layer(layers_dir / "salt.tar", extra_files=[ExtraFile(f"etc/bench-salt-{salt}", salt.encode(),
                                                                       0o644)])
    layers = [bottom, *saved]
    return ImageConfig(layers=layers, labels={"org.envmgr.bench": "load-paths"},
                       history=[f"layer {i}" for i in range(len(layers))])


def load_by_sendfile(engine, config, present=frozenset()) -> None:
    from envmgr.images.image import archive_pieces, pieces_size

    pieces = archive_pieces(config, [], present)
    engine.load_files(pieces, pieces_size(pieces))


def load_once(engine, config, present=frozenset()) -> None:
    import io

    from envmgr.images.image import write_archive

    read_end, write_end = os.pipe()
    import threading

    def produce() -> None:
        with os.fdopen(write_end, "wb", buffering=1 << 20) as sink:
            from envmgr.images.image import CountingWriter
            write_archive(CountingWriter(sink), config, [], present=present, verify_measured=False)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    with io.open(read_end, "rb", buffering=0) as source:
        engine.load_archive(iter(lambda: source.read(1 << 20), b""))
    thread.join()


def load_per_layer(engine, config) -> None:
    from envmgr.images.image import ImageConfig

    parts = []
    for count in range(1, len(config.layers) + 1):
        part = ImageConfig(layers=config.layers[:count], labels=config.labels, history=config.history[:count])
        load_by_sendfile(engine, part, present=frozenset(layer.diff_id for layer in config.layers[:count - 1]))
        parts.append(part.image_id())
    for image_id in parts[:-1]:   # the whole image's chain holds their layers now
        engine.remove_image(image_id)


def load_pipelined(engine, config) -> None:
    from envmgr.build.load_steps import STEP_BYTES, load_in_steps

    load_in_steps(engine, config, frozenset(), step_bytes=STEP_BYTES)


WAYS = ("load: pipe (before)", "load: sendfile (one archive)", "load: steps (pipelined)", "load/layer (sendfile)",
        "push+pull")


def push(registry: str, repository: str, config) -> None:
    import requests

    session = requests.Session()
    base = f"http://{registry}/v2/{repository}"

    def blob(data_source, digest: str) -> None:
        start = session.post(f"{base}/blobs/uploads/")
        start.raise_for_status()
        location = start.headers["Location"]
        if location.startswith("/"):
            location = f"http://{registry}{location}"
        sep = "&" if "?" in location else "?"
        done = session.put(f"{location}{sep}digest={digest}", data=data_source,
                           headers={"Content-Type": "application/octet-stream"})
        done.raise_for_status()

    descriptors = []
    for layer in config.layers:
        with open(layer.path, "rb") as fh:
            blob(iter(lambda fh=fh: fh.read(1 << 20), b""), layer.diff_id)
        descriptors.append({"mediaType": "application/vnd.docker.image.rootfs.diff.tar", "size": layer.size,
                            "digest": layer.diff_id})
    config_bytes = config.to_bytes()
    blob(config_bytes, config.image_id())
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "size": len(config_bytes),
                           "digest": config.image_id()}, "layers": descriptors}
    answer = session.put(f"{base}/manifests/latest", data=json.dumps(manifest),
                         headers={"Content-Type": "application/vnd.docker.distribution.manifest.v2+json"})
    answer.raise_for_status()


def written_bytes() -> int:
    """Bytes the machine's disks wrote so far (/proc/diskstats: whole disks, every process's writes)."""
    total = 0
    with open("/proc/diskstats") as fh:
        for line in fh:
            fields = line.split()
            if re.fullmatch(r"(sd|vd|xvd)[a-z]+|nvme\d+n\d+", fields[2]):
                total += int(fields[9]) * 512
    return total


def engine_cpu_seconds() -> float:
    """CPU seconds dockerd and its reaped children (docker-untar, docker-applyLayer) used so far; 0 unknown.
    The engine's work for every client, not only this bench's."""
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "comm").read_text().strip() == "dockerd":
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                return sum(int(value) for value in fields[11:15]) / os.sysconf("SC_CLK_TCK")
        except OSError:
            continue
    return 0.0


def disk_write(path: Path, total: int) -> float:
    block = os.urandom(1 << 20)
    started = time.monotonic()
    with open(path, "wb") as fh:
        for _ in range(total >> 20):
            fh.write(block)
        fh.flush()
        os.fsync(fh.fileno())
    elapsed = time.monotonic() - started
    path.unlink()
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.0, help="total layer bytes (sd-demo: about 5.3)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workdir", default="/var/tmp")
    parser.add_argument("--image", help="instead of --gb's made-up trees: the layers of this image in the "
                        "engine (e.g. envmgr/sd-demo:latest), under a salt layer")
    parser.add_argument("--ways", default=",".join(WAYS), help="comma-separated, of: " + ", ".join(WAYS))
    args = parser.parse_args()
    from envmgr.door.engine import Engine

    engine = Engine()
    work = Path(tempfile.mkdtemp(prefix="envmgr-load-paths-", dir=args.workdir))
    total = int(args.gb * 1e9)
    times: dict[str, list[float]] = {}
    ids: dict[str, set[str]] = {}
    try:
        saved = saved_layers(engine, args.image, work / "saved") if args.image else []
        trees = [] if args.image else make_trees(work / "trees", total)
        total = sum(layer.size for layer in saved) or total
        for round_ in range(args.rounds):
            for way in [w.strip() for w in args.ways.split(",")]:
                salt = f"{os.getpid()}-{round_}-{re.sub('[^a-z]+', '-', way)}"
                layers_dir = work / "layers"
                config = (salted_image(saved, layers_dir, salt) if saved
                          else image_of(trees, layers_dir, salt, measured=way.startswith("load:")))
                load_average = os.getloadavg()[0]
                written, cpu = written_bytes(), engine_cpu_seconds()
                image_id = config.image_id()
                try:
                    started = time.monotonic()
                    if way == "load: pipe (before)":
                        load_once(engine, config)
                    elif way == "load: sendfile (one archive)":
                        load_by_sendfile(engine, config)
                    elif way == "load: steps (pipelined)":
                        load_pipelined(engine, config)
                    elif way == "load/layer (sendfile)":
                        load_per_layer(engine, config)
                    else:
                        proc, registry = start_registry(work / f"registry-{salt}")
                        try:
                            push(registry, "bench/load-paths", config)
                            pushed = time.monotonic()
                            times.setdefault("push", []).append(pushed - started)
                            for _ in engine.pull(f"{registry}/bench/load-paths", "latest", None):
                                pass
                            times.setdefault("pull", []).append(time.monotonic() - pushed)
                            engine.tag(image_id, f"{registry}/bench/load-paths", "latest")
                        finally:
                            proc.terminate()
                            proc.wait(timeout=10)
                            shutil.rmtree(work / f"registry-{salt}", ignore_errors=True)
                    times.setdefault(way, []).append(time.monotonic() - started)
                    print(f"round {round_} {way}: {times[way][-1]:.1f} s (load average before: {load_average:.2f}, "
                          f"after: {os.getloadavg()[0]:.2f}; disks wrote {(written_bytes() - written) / 1e9:.1f} GB, "
                          f"the engine used {engine_cpu_seconds() - cpu:.0f} CPU s meanwhile, for all its clients)",
                          flush=True)
                    ids.setdefault(way, set()).add(str(engine.image_id(image_id)) == image_id)
                finally:
                    for ref in (image_id,):
                        try:
                            engine._api.remove_image(ref, force=True)
                        except Exception:  # noqa: BLE001 - gone already
                            pass
                    from envmgr.build.load_steps import remove_partials

                    remove_partials(engine, image_id)
                    shutil.rmtree(layers_dir, ignore_errors=True)
            times.setdefault("disk: one write (fsync)", []).append(disk_write(work / "disk.bin", total))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results = {way: round(min(values), 1) for way, values in times.items()}
    results["gb"] = round(total / 1e9, 2)
    results["same_image_id"] = all(all(v) for v in ids.values())
    results["rounds"] = {way: [round(v, 1) for v in values] for way, values in times.items()}
    OUT.mkdir(exist_ok=True)
    (OUT / "load_paths.json").write_text(json.dumps(results, indent=1))
    for key, value in results.items():
        print(f"{key:>26}  {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
