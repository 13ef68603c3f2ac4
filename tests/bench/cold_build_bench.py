"""The first build side by side (issue 26): a hand-written Dockerfile with uv against `envmgr build`, both cold.

Both install the same locked pins on the same base image, in one run on this machine:
  - baseline: `docker build` (Debian's /usr/bin/docker, DOCKER_BUILDKIT=0: Engine 20.10's legacy builder,
    --network=host) of `FROM <the method's base image>` + one RUN: `uv venv`, then
    `uv pip install --require-hashes --no-deps --compile-bytecode --no-cache` of the lock's entries. uv, the
    requirements and the host's mirror settings (envmgr.door.mirrors.uv_env, the CA bundle) come from a server
    on 127.0.0.1 and are removed in the same RUN: no credential in a layer or in the image's history;
  - envmgr: `envmgr build` with a new cache dir (empty uv cache and layer store) and the engine lacking
    the method's environment layers (the base layer and the venv skeleton are shared with every method).
Each is printed per phase (uv's own Prepared / Installed / Bytecode figures, envmgr's progress tasks and
its ENVMGR-PHASE marks), against the physical floor: downloading the wheels (parallel GETs from the same
mirror, nothing unpacked, or the baseline uv's Prepared when faster) plus one write of the environment's
bytes (fsync'd).

Default method: `cold-bench`, a pip method holding sd-demo's locked distributions without torch, triton and
the CUDA wheels (about 60 distributions; the sd-demo figure takes ~3.5 GB of downloads per side). `--method
sd-demo` builds sd-demo itself. Either way every sd-demo image must leave the engine first (`--remove-sd-demo`
does it; other people's images of it go too): a new cache learns the layers of any image holding the same
distributions, and a build that learned any is refused as not cold.
Run: `.venv/bin/python -m tests.bench.cold_build_bench [--method sd-demo --remove-sd-demo] [--rounds N]`.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "bench-results"
SMALL = "cold-bench"
LEFT_OUT = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")   # sd-demo's GPU stack: not in the small method
DOCKER = "/usr/bin/docker"   # Debian's CLI (the newer one on PATH has no legacy builder)


def sd_demo_entries() -> tuple[list[str], object, object]:
    """sd-demo's locked requirement entries (one per distribution), its spec and its base image."""
    from envmgr.lock.backends import get_backend
    from envmgr.images.base import ensure_base
    from envmgr.core.config import load_config
    from envmgr.door.context import Context
    from envmgr.core.spec import find_method
    from envmgr.core.ui import Reporter

    ctx = Context(load_config(files=[]), Reporter("plain"))
    spec = find_method("sd-demo", None)
    base = ensure_base(ctx, spec.base_image)
    return get_backend(spec).requirement_entries(spec, base), spec, base


def small_method(base_dir: Path, entries: list[str]) -> list[str]:
    """A pip method `cold-bench` whose lock is sd-demo's entries without the GPU stack; returns its entries."""
    from envmgr.lock.backends.pip import HEADER, LOCK, MANIFEST, PipBackend
    from envmgr.build.layers import canonical_requirement
    from envmgr.core.spec import find_method

    kept = [entry for entry in entries if not LEFT_OUT.match(canonical_requirement(entry)[0])]
    folder = base_dir / "methods" / SMALL
    folder.mkdir(parents=True)
    (folder / "envmgr.toml").write_text(f'name = "{SMALL}"\ndescription = "issue 26 bench: sd-demo without its GPU '
                                        'stack"\nbackend = "pip"\nentry = ["python", "main.py"]\ngpu = "none"\n')
    (folder / "main.py").write_text("print('cold bench')\n")
    pins = [entry.split("\\")[0].split(";")[0].strip() for entry in kept]
    (folder / MANIFEST).write_text("".join(pin + "\n" for pin in pins))
    spec = find_method(SMALL, base_dir)
    backend = PipBackend()
    effective, _, _ = backend._effective({}, spec)
    (spec.lock_path / LOCK).write_text(HEADER + backend._inputs_hash(effective, spec) + "\n"
                                       + "".join(entry + "\n" for entry in kept))
    backend.check(spec)
    return kept


# ---------------------------------------------------------------------- the baseline


class _Files(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        data = self.files.get(self.path.lstrip("/"))
        if data is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


def serve(files: dict[str, bytes]) -> tuple[http.server.ThreadingHTTPServer, int]:
    handler = type("Files", (_Files,), {"files": files})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


def baseline_files(ctx, entries: list[str]) -> dict[str, bytes]:
    """What the Dockerfile's RUN fetches from 127.0.0.1: uv, the requirements, the host's uv settings, the CA."""
    from envmgr.core import paths
    from envmgr.door.mirrors import uv_env

    settings = uv_env(ctx.config.mirrors)
    settings.pop("UV_LINK_MODE", None)   # an admin's Dockerfile takes uv's default
    ca = ctx.config.mirrors.ca_bundle
    files = {"uv": ctx.uv_binary().read_bytes(), "requirements.txt": "".join(e + "\n" for e in entries).encode()}
    if ca and Path(ca).is_file():
        files["ca.crt"] = Path(ca).read_bytes()
    lines = [f"export {key}={shlex.quote('/tmp/bench/ca.crt' if value == paths.CONTAINER_CA_BUNDLE else value)}"
             for key, value in settings.items()]
    files["env.sh"] = ("\n".join(lines) + "\n").encode()
    return files


def dockerfile(base_image: str, python: str, port: int, names: list[str]) -> str:
    fetch = (f"{python} -c \"import sys, urllib.request as u; [open('/tmp/bench/' + n, 'wb').write(u.urlopen("
             f"'http://127.0.0.1:{port}/' + n).read()) for n in sys.argv[1:]]\" {' '.join(names)}")
    return "\n".join([
        f"FROM {base_image}",
        "RUN mkdir -p /tmp/bench && " + fetch + " && chmod +x /tmp/bench/uv && . /tmp/bench/env.sh"
        " && echo BENCH-FETCHED"
        f" && /tmp/bench/uv venv --python {python} /opt/venv"
        " && /tmp/bench/uv pip install --python /opt/venv/bin/python --require-hashes --no-deps --compile-bytecode"
        " --no-cache -r /tmp/bench/requirements.txt"
        " && rm -rf /tmp/bench && echo BENCH-RUN-DONE",
        "",
    ])


ANSI = re.compile(r"\x1b\[[0-9;]*m")
UV_FIGURE = re.compile(r"(Prepared|Installed|Bytecode compiled) \d+ (?:packages?|files?) in (?:(\d+)m )?([\d.]+)(ms|s)")


def uv_figures(lines: list[tuple[float, str]]) -> dict[str, float]:
    """uv's own durations: `Prepared 79 packages in 2m 22s`, `Installed 79 packages in 3.25s`, `... in 812ms`."""
    found = {}
    for _, line in lines:
        match = UV_FIGURE.search(line)
        if match:
            seconds = float(match.group(3)) / (1000 if match.group(4) == "ms" else 1)
            found[match.group(1)] = 60 * int(match.group(2) or 0) + seconds
    return found


def timed_lines(command: list[str], env: dict[str, str]) -> tuple[float, list[tuple[float, str]], int]:
    """Run `command`, timestamping each output line as it arrives (relative to the start)."""
    started = time.monotonic()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:   # the legacy builder colours a RUN's stderr in pieces: the codes go
        lines.append((time.monotonic() - started, ANSI.sub("", line.rstrip("\n"))))
    code = proc.wait()
    return time.monotonic() - started, lines, code


def when(lines: list[tuple[float, str]], text: str, exact: bool = False) -> float | None:
    """When the first line holding `text` (with `exact`: being `text`) arrived."""
    return next((t for t, line in lines if (line.strip() == text if exact else text in line)), None)


def baseline(ctx, base, entries: list[str], work: Path, tag: str) -> dict[str, float]:
    files = baseline_files(ctx, entries)
    server, port = serve(files)
    context = Path(tempfile.mkdtemp(prefix="baseline-context-", dir=work))   # one per round
    (context / "Dockerfile").write_text(dockerfile(base.image_id, base.python, port, sorted(files)))
    try:
        wall, lines, code = timed_lines([DOCKER, "build", "--network=host", "--no-cache", "-t", tag, str(context)],
                                        {**os.environ, "DOCKER_BUILDKIT": "0"})
    finally:
        server.shutdown()
    if code != 0:
        raise SystemExit("baseline docker build failed:\n" + "\n".join(line for _, line in lines[-30:]))
    uv = uv_figures(lines)
    fetched, run_done = when(lines, "BENCH-FETCHED", exact=True), when(lines, "BENCH-RUN-DONE", exact=True)
    committed = when(lines, "Removing intermediate container")
    phases = {"download+unpack (uv Prepared)": uv.get("Prepared", 0.0),
              "install (uv Installed)": uv.get("Installed", 0.0), "bytecode (uv)": uv.get("Bytecode compiled", 0.0)}
    if fetched is not None and run_done is not None:
        phases["RUN: everything else (venv, resolve, start)"] = max(0.0, run_done - fetched - sum(phases.values()))
        phases["container start + fetch from 127.0.0.1"] = fetched
    if committed is not None and run_done is not None:
        phases["commit (write the layer's tar-split, register)"] = committed - run_done
        phases["tag + rest"] = wall - committed
    return {"wall": wall, **phases}


# ---------------------------------------------------------------------- envmgr


def envmgr_cold(method: str, env: dict[str, str]) -> dict[str, float]:
    wall, lines, code = timed_lines([sys.executable, "-m", "envmgr", "--json", "-v", "build", method], env)
    if code != 0:
        raise SystemExit(f"envmgr build {method} failed:\n" + "\n".join(line for _, line in lines[-30:]))
    events = [json.loads(line) for _, line in lines if line.startswith("{")]
    learned = sorted({name for e in events if e.get("event") == "step" for name in e.get("learned") or []})
    if learned:
        raise SystemExit(f"not a cold build: {len(learned)} distribution(s) were learned from images in the engine "
                         f"({', '.join(learned[:5])}, ...): remove the images that hold them")
    timeline = [(round(t, 1), f"{e.get('event')}: {e.get('message') or e.get('task') or e.get('line', '')}"[:120])
                for t, line in lines if line.startswith("{")
                for e in [json.loads(line)] if e.get("event") != "log" or "ENVMGR-PHASE" in e.get("line", "")]
    tasks = {e["task"]: float(e["seconds"]) for e in events if e.get("event") == "progress-end"}
    logs = [(0.0, e.get("line", "")) for e in events if e.get("event") == "log"]
    marks = {}
    for _, line in logs:
        match = re.match(r"ENVMGR-PHASE (installed|gpu-facts|split|compiled) at ([\d.]+) s", line)
        if match:
            marks[match.group(1)] = float(match.group(2))
    uv = uv_figures(logs)
    install = next((s for t, s in tasks.items() if t.startswith("installing ")), 0.0)
    write = next((s for t, s in tasks.items() if t.startswith("writing environment layers")), 0.0)
    load = next((s for t, s in tasks.items() if t.startswith("loading the image into the engine")), 0.0)
    phases: dict[str, float] = {"download+unpack (uv Prepared)": uv.get("Prepared", 0.0),
                                "install (uv Installed)": uv.get("Installed", 0.0)}
    installed = marks.get("installed", 0.0)
    phases["install step: everything else (container, venv)"] = max(0.0, installed - sum(phases.values()))
    previous = installed
    for mark, name in (("gpu-facts", "GPU facts"), ("split", "split by RECORD (hash check)"),
                       ("compiled", "bytecode")):
        if mark in marks:
            phases[name] = marks[mark] - previous
            previous = marks[mark]
    phases["install task: rest (clean-up)"] = max(0.0, install - previous)
    phases["writing + hashing layers"] = write
    phases["engine load"] = load
    phases["rest (inputs, method layer, SBOM, tag, checks)"] = wall - install - write - load
    return {"wall": wall, **phases, "timeline": timeline}  # type: ignore[dict-item]


# ---------------------------------------------------------------------- the floor


def wheel_urls(ctx, entries: list[str]) -> list[tuple[str, str]]:
    """(url, sha256) of the wheel uv picks for each entry: the best-ranked tag this host's Python matches."""
    from html.parser import HTMLParser
    from urllib.parse import urldefrag, urljoin

    import requests
    from packaging.tags import sys_tags
    from packaging.utils import parse_wheel_filename

    from envmgr.build.layers import canonical_requirement

    rank = {tag: index for index, tag in enumerate(sys_tags())}
    index = (ctx.config.mirrors.pypi or "").rstrip("/")
    verify = ctx.config.mirrors.ca_bundle or True

    class Links(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.links: list[str] = []

        def handle_starttag(self, tag, attrs) -> None:
            if tag == "a":
                self.links += [value for key, value in attrs if key == "href" and value]

    found = []
    session = requests.Session()
    for entry in entries:
        name, line = canonical_requirement(entry)
        hashes = set(re.findall(r"sha256:([0-9a-f]{64})", line))
        page = session.get(f"{index}/{name}/", verify=verify, timeout=60)
        page.raise_for_status()
        parser = Links()
        parser.feed(page.text)
        best = None
        for link in parser.links:
            url, fragment = urldefrag(urljoin(page.url, link))
            filename = url.rsplit("/", 1)[-1]
            digest = fragment.split("=", 1)[-1]
            if not filename.endswith(".whl") or digest not in hashes:
                continue
            score = min((rank[t] for t in parse_wheel_filename(filename)[3] if t in rank), default=None)
            if score is not None and (best is None or score < best[0]):
                best = (score, url, digest)
        if best:
            found.append((best[1], best[2]))
    return found


def download_floor(ctx, entries: list[str]) -> tuple[float, int]:
    """Seconds to GET every wheel (8 at a time, bytes discarded) and the bytes fetched."""
    from concurrent.futures import ThreadPoolExecutor

    import requests

    urls = wheel_urls(ctx, entries)
    verify = ctx.config.mirrors.ca_bundle or True

    def fetch(item: tuple[str, str]) -> int:
        size = 0
        with requests.get(item[0], stream=True, verify=verify, timeout=600) as answer:
            answer.raise_for_status()
            for chunk in answer.iter_content(1 << 20):
                size += len(chunk)
        return size

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=8) as pool:
        total = sum(pool.map(fetch, urls))
    return time.monotonic() - started, total


def write_floor(path: Path, total: int) -> float:
    block = os.urandom(1 << 20)
    started = time.monotonic()
    with open(path, "wb") as fh:
        for _ in range(max(1, total >> 20)):
            fh.write(block)
        fh.flush()
        os.fsync(fh.fileno())
    elapsed = time.monotonic() - started
    path.unlink()
    return elapsed


# ---------------------------------------------------------------------- the run


def remove_images(ctx, label: str) -> None:
    for image in ctx.engine.images(label=label):
        ctx.engine._api.remove_image(image["Id"], force=True)


def table(results: dict) -> None:
    rows = [("", "baseline (docker build + uv)", "envmgr build")]
    for side in ("baseline", "envmgr"):
        for phase, seconds in results[side].items():
            if phase not in ("wall", "timeline"):
                rows.append((f"{side}: {phase}", f"{seconds:.1f} s" if side == "baseline" else "",
                             f"{seconds:.1f} s" if side == "envmgr" else ""))
    rows.append(("wall", f"{results['baseline']['wall']:.1f} s", f"{results['envmgr']['wall']:.1f} s"))
    width = max(len(r[0]) for r in rows)
    for name, left, right in rows:
        print(f"{name:<{width}}  {left:>28}  {right:>12}")
    floor = results["floor"]
    print(f"floor: download {floor['download_s']:.1f} s ({floor['wheel_bytes'] / 1e9:.2f} GB of wheels) + one write "
          f"of {floor['env_bytes'] / 1e9:.2f} GB {floor['write_s']:.1f} s = {floor['total_s']:.1f} s")
    print(f"envmgr / baseline: {results['ratio']:.2f}x   envmgr / floor: "
          f"{results['envmgr']['wall'] / floor['total_s']:.2f}x   baseline / floor: "
          f"{results['baseline']['wall'] / floor['total_s']:.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=(SMALL, "sd-demo"), default=SMALL)
    parser.add_argument("--remove-sd-demo", action="store_true",
                        help="remove every sd-demo image from the engine first, so the build is cold (a new cache "
                             "learns the layers of any image that holds the same distributions)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds (interleaved; the minimum of each kept)")
    parser.add_argument("--workdir", default="/var/tmp")
    args = parser.parse_args()
    from envmgr.core.config import load_config
    from envmgr.door.context import Context
    from envmgr.core.ui import Reporter

    store = Path(os.environ.get("ENVMGR_TEST_STORE", "/var/tmp/envmgr-test-store"))   # the base rootfs only
    work = Path(tempfile.mkdtemp(prefix="envmgr-cold-bench-", dir=args.workdir))
    base_dir = work / "base"
    os.environ.update(ENVMGR_STORE_DIR=str(store))
    ctx = Context(load_config(files=[]), Reporter("plain"))
    entries, _spec, base = sd_demo_entries()
    label = "org.envmgr.method=sd-demo"
    if ctx.engine.images(label=label):     # the small method's distributions are sd-demo's: learned from them
        if not args.remove_sd_demo:
            raise SystemExit("the engine holds sd-demo images, whose layers a new cache learns: the build would "
                             "not be cold (--remove-sd-demo removes them, other people's too)")
        remove_images(ctx, label)
    if args.method == SMALL:
        entries = small_method(base_dir, entries)
        label = f"org.envmgr.method={SMALL}"
    tag = f"envmgr-bench/dockerfile-{args.method}:{os.getpid()}"
    runs: dict[str, list[dict[str, float]]] = {"baseline": [], "envmgr": []}
    env_bytes = 0
    image_ids: set[str] = set()
    try:
        for round_ in range(args.rounds):
            cache = work / f"cache-{round_}"   # a new cache: empty uv cache and layer store
            env = {**os.environ, "ENVMGR_CACHE_DIR": str(cache), "ENVMGR_BASE_DIR": str(base_dir),
                   "ENVMGR_CONFIG": "/dev/null", "ENVMGR_STORE_DIR": str(store), "PYTHONPATH": str(REPO)}
            order = ("baseline", "envmgr") if round_ % 2 == 0 else ("envmgr", "baseline")
            for side in order:
                if side == "baseline":
                    runs["baseline"].append(baseline(ctx, base, entries, work, tag))
                    ctx.engine.remove_image(tag)
                else:
                    remove_images(ctx, label)
                    runs["envmgr"].append(envmgr_cold(args.method, env))
                    image = ctx.engine.inspect_image(f"envmgr/{args.method}:latest") or {}
                    env_bytes = int(image.get("Size", 0)) - base.layer.size   # the environment (+ method files)
                    image_ids.add(str(image.get("Id")))
                    if args.method == SMALL:
                        remove_images(ctx, label)
            shutil.rmtree(cache, ignore_errors=True)
        download_s, wheel_bytes = download_floor(ctx, entries)
        # uv's own Prepared (download + unzip, streamed) can beat these GETs: the floor takes the faster
        download_s = min([download_s, *(run["download+unpack (uv Prepared)"] for run in runs["baseline"])])
        write_s = write_floor(work / "floor.bin", env_bytes)
    finally:
        if args.method == SMALL:
            remove_images(ctx, label)
        ctx.engine.remove_image(tag)
        shutil.rmtree(work, ignore_errors=True)
    best = {side: min(found, key=lambda r: r["wall"]) for side, found in runs.items()}
    results = {**best, "floor": {"download_s": download_s, "wheel_bytes": wheel_bytes, "env_bytes": env_bytes,
                                 "write_s": write_s, "total_s": download_s + write_s},
               "ratio": best["envmgr"]["wall"] / best["baseline"]["wall"], "method": args.method,
               "distributions": len(entries), "rounds": args.rounds, "envmgr_image_ids": sorted(image_ids)}
    OUT.mkdir(exist_ok=True)
    (OUT / f"cold_build-{args.method}.json").write_text(json.dumps(results, indent=1))
    print(f"cold build of {args.method} ({len(entries)} distributions), best of {args.rounds} round(s):")
    table(results)
    print(f"envmgr's image ID in every round: {', '.join(i[:19] for i in sorted(image_ids))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
