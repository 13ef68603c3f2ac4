"""Per-distribution environment layers (issue 14): a real engine, a loopback index, locally built wheels.

Methods here are pip methods (locked with `uv pip compile`, fast) with names unique to this module.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import tarfile
import uuid
import zipfile
from pathlib import Path

import pytest

from envmgr.layers import COMPILE_CHUNK_FILES
from tests.support.pypi import FIXED_TIME, Index, build_wheel

REPO = Path(__file__).resolve().parents[2]
BIG_MB = 34   # over envmgr.layers.BIG_BYTES (32 MiB): a torch-like distribution with a layer of its own


def build_big_wheel(out_dir: Path, name: str, version: str) -> Path:
    """A wheel whose installed size is over the big-layer threshold (incompressible, yet byte-identical)."""
    module = name.replace("-", "_")
    dist = f"{module}-{version}"
    blob = random.Random(f"{name}-{version}").randbytes(BIG_MB << 20)
    files = {f"{module}/__init__.py": f'VERSION = "{version}"\n'.encode(), f"{module}/kernels.bin": blob,
             f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
             f"{dist}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: envmgr-tests\nRoot-Is-Purelib: true\n"
                                        b"Tag: py3-none-any\n",
             f"{dist}.dist-info/entry_points.txt": f"[console_scripts]\n{name}-tool = {module}:main\n".encode()}
    files[f"{module}/__init__.py"] += b"def main():\n    print('big')\n"
    import base64

    record = [f"{p},sha256={base64.urlsafe_b64encode(hashlib.sha256(d).digest()).rstrip(b'=').decode()},{len(d)}"
              for p, d in files.items()] + [f"{dist}.dist-info/RECORD,,"]
    files[f"{dist}.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    path = out_dir / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for file_name, data in files.items():
            zf.writestr(zipfile.ZipInfo(file_name, FIXED_TIME), data)
    return path


SMALL = ["lyr-apple", "lyr-berry", "lyr-cherry", "lyr-date", "lyr-elder", "lyr-fig", "lyr-grape", "lyr-kiwi"]


@pytest.fixture(scope="module")
def layer_index(tmp_path_factory):
    root = tmp_path_factory.mktemp("layer-wheels")
    for name in SMALL:
        build_wheel(root, name, "1.0", body=f'NAME = "{name}-1.0"\n')
    build_wheel(root, "lyr-apple", "1.1", body='NAME = "lyr-apple-1.1"\n')
    build_wheel(root, "lyr-ns-one", "1.0", extra={"lyr_shared/one.py": "ONE = 1\n"})
    build_wheel(root, "lyr-ns-two", "1.0", extra={"lyr_shared/two.py": "TWO = 2\n"})
    build_wheel(root, "lyr-hook", "1.0", extra={"lyr_hook.pth": "import lyr_hook\n"})
    # more sources than one compiling run holds, sharing names and constants: the layered build compiles
    # them in several runs, the single install in one process; their pycs must still be the same bytes
    build_wheel(root, "lyr-many", "1.0", extra={
        f"lyr_many/m{i:03d}.py": (f'"""Module {i}."""\nSHARED = ("shared", {i % 7}, frozenset({{"a", "b{i % 3}"}}))\n'
                                  f"def common(x=SHARED):\n    return ('common', x, {i})\n"
                                  f"class Thing{i % 5}:\n    name = 'thing'\n    def go(self):\n"
                                  f"        return common(), '{'m' * (i % 40)}'\n")
        for i in range(COMPILE_CHUNK_FILES + 50)})
    build_wheel(root, "lyr-broken", "1.0", extra={"lyr_broken/bad.py": "def broken(:\n",
                                                  "lyr_broken/zz_good.py": "GOOD = 1\n"})
    build_big_wheel(root, "lyr-bigtorch", "2.0")
    build_big_wheel(root, "lyr-bigsolo", "1.0")   # used by one test only: no other image holds its chain
    index = Index(root).start()
    yield index
    index.stop()


class Methods:
    """A base dir with pip methods of unique names, and a CLI runner bound to it."""

    def __init__(self, root: Path, store: Path, mirror: str):
        self.base_dir = root / "base"
        self.cache_dir = root / "cache"
        self.store = store
        self.mirror = mirror
        self.names: list[str] = []

    def add(self, requirements: list[str]) -> str:
        name = f"lyr-{uuid.uuid4().hex[:8]}"
        folder = self.base_dir / "methods" / name
        folder.mkdir(parents=True)
        (folder / "envmgr.toml").write_text(f'name = "{name}"\nbackend = "pip"\nentry = ["python", "main.py"]\n'
                                            'gpu = "none"\n')
        (folder / "requirements.txt").write_text("\n".join(requirements) + "\n")
        (folder / "main.py").write_text("import sys\nprint(sys.prefix)\n")
        self.names.append(name)
        return name

    def requirements(self, name: str, requirements: list[str]) -> None:
        (self.base_dir / "methods" / name / "requirements.txt").write_text("\n".join(requirements) + "\n")

    def env(self, cache: Path | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ENVMGR_")}
        env.update(ENVMGR_BASE_DIR=str(self.base_dir), ENVMGR_CACHE_DIR=str(cache or self.cache_dir),
                   ENVMGR_STORE_DIR=str(self.store), ENVMGR_CONFIG="/dev/null", ENVMGR_MIRRORS_PYPI=self.mirror)
        return env

    def envmgr(self, *args: str, cache: Path | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "envmgr", *args], capture_output=True, text=True,
                              env=self.env(cache), cwd=REPO, timeout=900)
        if proc.returncode != 0:
            raise AssertionError(f"envmgr {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    def build(self, name: str, *extra: str, cache: Path | None = None) -> dict:
        proc = self.envmgr("--json", "build", name, *extra, cache=cache)
        done = [e for e in (json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{"))
                if e.get("event") == "done"][-1]
        done["stderr"] = proc.stderr + proc.stdout
        return done


@pytest.fixture
def methods(tmp_path, store, engine, layer_index):
    ws = Methods(tmp_path, store, layer_index.url)
    yield ws
    for name in ws.names:
        for image in engine.images.list(f"envmgr/{name}"):
            try:
                engine.images.remove(image.id, force=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
    subprocess.run(["rm", "-rf", str(tmp_path / "cache"), str(tmp_path / "cache2")], check=False)


def _layers(engine, image: str) -> list[str]:
    return engine.images.get(image).attrs["RootFS"]["Layers"]


def _chain_ids(diff_ids: list[str]) -> list[str]:
    chains, chain = [], None
    for diff_id in diff_ids:
        chain = diff_id if chain is None else "sha256:" + hashlib.sha256(f"{chain} {diff_id}".encode()).hexdigest()
        chains.append(chain)
    return chains


def test_pin_bump_changes_one_layer_and_reuses_every_other(methods, engine):
    reqs = [*SMALL[1:], "lyr-apple==1.0", "lyr-bigtorch"]
    name = methods.add(reqs)
    methods.envmgr("lock", name)
    first = methods.build(name)
    before = _layers(engine, first["image"])
    assert len(before) >= 4, before   # base, skeleton, the big one, buckets..., method
    methods.requirements(name, [*SMALL[1:], "lyr-apple==1.1", "lyr-bigtorch"])
    methods.envmgr("lock", name)
    second = methods.build(name)
    after = _layers(engine, second["image"])
    assert len(after) == len(before)
    changed = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
    # one environment layer (apple's bucket) and the method layer (its inputs hash) changed, nothing else
    assert len(changed) == 2 and changed[-1] == len(after) - 1, changed
    assert "1 of" in second["stderr"] or "installed now" in second["stderr"]
    out = engine.containers.run(second["tag"], ["python", "-c", "import lyr_apple, lyr_bigtorch; "
                                                "print(lyr_apple.NAME, lyr_bigtorch.VERSION)"],
                                remove=True, network_mode="none")
    assert out.decode().split() == ["lyr-apple-1.1", "2.0"]


def test_two_methods_share_the_big_layer_in_the_engine(methods, engine):
    one = methods.add(["lyr-bigtorch", "lyr-apple==1.0", "lyr-berry"])
    two = methods.add(["lyr-bigtorch", "lyr-cherry", "lyr-date"])
    for name in (one, two):
        methods.envmgr("lock", name)
    layers = [_layers(engine, methods.build(name)["image"]) for name in (one, two)]
    # base, skeleton and the big layer are the same, so are their chain IDs: the engine keeps them once
    assert layers[0][:3] == layers[1][:3]
    assert _chain_ids(layers[0])[2] == _chain_ids(layers[1])[2]
    # the engine holds the big layer; the store dropped its copy (the environment is not kept twice)
    big = Path(methods.cache_dir / "store" / "layers" / layers[0][2].split(":", 1)[1])
    assert not big.exists()
    assert big.parent.is_dir() and any(big.parent.iterdir())   # the small ones stay for fast pin bumps
    layerdb = Path("/var/lib/docker/image/overlay2/layerdb/sha256") / _chain_ids(layers[0])[2].split(":", 1)[1]
    if layerdb.parent.is_dir():   # readable when the engine runs on this machine as root
        assert layerdb.is_dir() and (layerdb / "diff").read_text() == layers[0][2]
    out = engine.containers.run(f"envmgr/{two}:latest", ["lyr-bigtorch-tool"], remove=True, network_mode="none")
    assert out.decode().strip() == "big"


def test_damaged_store_entry_is_rebuilt_never_loaded(methods, engine):
    name = methods.add(["lyr-apple==1.0", "lyr-berry"])
    methods.envmgr("lock", name)
    first = methods.build(name)
    diff_ids = _layers(engine, first["image"])
    store = methods.cache_dir / "store" / "layers"
    victim = store / diff_ids[2].split(":", 1)[1]
    data = bytearray(victim.read_bytes())
    data[1024] ^= 0xFF
    victim.write_bytes(bytes(data))
    engine.images.remove(first["image"], force=True)
    second = methods.build(name)
    assert "damaged" in second["stderr"]
    assert second["image"] == first["image"]
    assert "sha256:" + hashlib.sha256(victim.read_bytes()).hexdigest() == diff_ids[2]


def test_two_clean_builds_give_the_same_image_id(methods, tmp_path):
    name = methods.add(["lyr-apple==1.0", "lyr-ns-one", "lyr-ns-two", "lyr-hook", "lyr-fig"])
    methods.envmgr("lock", name)
    first = methods.build(name)
    second = methods.build(name, "--force", cache=tmp_path / "cache2")
    assert second["image"] == first["image"]


def _tree(root: Path) -> dict[str, bytes | str]:
    found: dict[str, bytes | str] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            found[rel] = "link:" + os.readlink(path)
        elif path.is_file():
            found[rel] = path.read_bytes()
    return found


def _assert_cache_holds_the_wheels_unchanged(uv_cache: Path, wheels: list[Path]) -> int:
    """Each wheel uv unpacked into its cache still has its files byte for byte (hard links written through
    would show here); returns how many wheels were found there."""
    archives = [p for p in (uv_cache / "archive-v0").iterdir() if p.is_dir()]
    found = 0
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            names = [n for n in zf.namelist() if not n.endswith("/")]
            homes = [a for a in archives if all((a / n).is_file() for n in names)
                     and (a / names[0]).read_bytes() == zf.read(names[0])]
            for home in homes[:1]:
                found += 1
                assert {n: (home / n).read_bytes() for n in names} == {n: zf.read(n) for n in names}, wheel.name
    return found


def test_layered_environment_equals_a_single_install(methods, tmp_path, store, layer_index, monkeypatch):
    """Same files, byte for byte (pycs, RECORDs, .pth files, scripts), as one uv install of the same lock;
    uv hard-linked them from its cache, and the cache's files are unchanged."""
    from envmgr import paths
    from envmgr.backends.common import install_requirements_script, run_step, uv_mounts, uv_step_env
    from envmgr.base import ensure_base
    from envmgr.build import target
    from envmgr.config import load_config
    from envmgr.containers import BindMount
    from envmgr.context import Context
    from envmgr.layers import PHYSICAL_PREFIX
    from envmgr.spec import find_method
    from envmgr.ui import Reporter

    name = methods.add(["lyr-apple==1.0", "lyr-ns-one", "lyr-ns-two", "lyr-hook", "lyr-bigtorch", "lyr-kiwi",
                        "lyr-broken", "lyr-many"])
    methods.envmgr("lock", name)
    os.environ["ENVMGR_STORE_DIR"] = str(store)
    ctx = Context(config=load_config({"cache_dir": str(methods.cache_dir), "base_dir": str(methods.base_dir),
                                      "mirrors": {"pypi": methods.mirror}}, files=[]), ui=Reporter("plain"))
    spec = find_method(name, methods.base_dir)
    base = ensure_base(ctx, spec.base_image)
    logged: list[str] = []
    monkeypatch.setattr(ctx.ui, "log", logged.append)
    config = target(ctx, spec, base).config(ctx)
    assert "uv cache: hard links from the lent cache" in logged
    assert not [line for line in logged if "hardlink" in line.lower() and "fail" in line.lower()]
    assert _assert_cache_holds_the_wheels_unchanged(methods.cache_dir / "uv", layer_index.files()) >= 6
    layered = tmp_path / "layered"
    layered.mkdir()
    for layer in config.layers[1:-1]:
        with tarfile.open(layer.path) as tar:
            tar.extractall(layered, filter="tar")
    single = tmp_path / "single"
    single.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    (work / "requirements.txt").write_text((spec.lock_path / "requirements.lock.txt").read_text())
    run_step(ctx, base, "single install", install_requirements_script(base, PHYSICAL_PREFIX,
                                                                        f"{paths.CONTAINER_WORK}/requirements.txt"),
             [BindMount(single, PHYSICAL_PREFIX, read_only=False), BindMount(work, paths.CONTAINER_WORK),
              *uv_mounts(ctx)], uv_step_env(ctx))
    got = _tree(layered / PHYSICAL_PREFIX.lstrip("/"))
    want = _tree(single)
    assert want.pop(".lock", b"") == b""   # uv's install-time lock file, empty: the one file no layer holds
    assert sorted(got) == sorted(want)
    assert got == want
    records = [k for k in got if k.endswith(".dist-info/RECORD")]
    assert len(records) == 8 and any("lyr_bigtorch" in k for k in records)
    assert len([k for k in got if "/lyr_many/__pycache__/m" in k]) == COMPILE_CHUNK_FILES + 50
    # a source that does not compile fails neither build, and the sources after it in its run still compile
    broken = sorted(k for k in got if k.split("site-packages/")[-1].startswith("lyr_broken/"))
    assert [k.rsplit("/", 1)[-1].split(".")[0] for k in broken if k.endswith(".pyc")] == ["__init__", "zz_good"]
    assert got["bin/lyr-bigtorch-tool"].startswith(f"#!{PHYSICAL_PREFIX}/bin/python".encode())  # type: ignore[union-attr]


def test_large_layers_live_only_in_the_engine_and_are_read_back_for_export(methods, engine, tmp_path):
    name = methods.add(["lyr-bigsolo", "lyr-apple==1.0"])
    methods.envmgr("lock", name)
    first = methods.build(name)
    assert "straight into the engine" in first["stderr"]
    diff_ids = _layers(engine, first["image"])
    store = methods.cache_dir / "store" / "layers"
    big = diff_ids[2]   # base, skeleton, then the big distribution (largest lowest)
    assert not (store / big.split(":", 1)[1]).exists()
    records = [json.loads(p.read_text()) for p in (methods.cache_dir / "store" / "index" / "groups").glob("*.json")]
    assert any(r["diff_id"] == big and r.get("released") for r in records)

    # export reads the big layer back from the engine, byte for byte, and leaves no copy behind
    out = tmp_path / "solo.envmgr.tar"
    methods.envmgr("export", name, "-o", str(out))
    with tarfile.open(out) as tar:
        member = tar.getmember(f"{big.split(':', 1)[1]}/layer.tar")
        assert "sha256:" + hashlib.sha256(tar.extractfile(member).read()).hexdigest() == big
    assert not (store / big.split(":", 1)[1]).exists()
    assert not list((methods.cache_dir / "work").glob("from-engine-*"))

    # what the engine holds is enough: a fresh cache (no layer store) and no reachable index (as on a
    # server that imported the image) export the same bytes
    env = {**methods.env(tmp_path / "fresh-cache"), "ENVMGR_MIRRORS_PYPI": "http://127.0.0.1:9/simple"}
    again = tmp_path / "again.envmgr.tar"
    proc = subprocess.run([sys.executable, "-m", "envmgr", "export", name, "-o", str(again)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert hashlib.sha256(again.read_bytes()).hexdigest() == hashlib.sha256(out.read_bytes()).hexdigest()
    assert not (tmp_path / "fresh-cache" / "store" / "layers").exists()

    # the engine loses the image (and with it the only copy): a rebuild installs that layer again
    engine.images.remove(first["image"], force=True)
    second = methods.build(name, "--force")
    assert "making them again" in second["stderr"], second["stderr"][-2000:]
    assert second["image"] == first["image"]
    assert not (store / big.split(":", 1)[1]).exists()   # handed over again
