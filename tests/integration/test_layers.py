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

from envmgr.build.layers import COMPILE_CHUNK_FILES
from tests.support.pypi import FIXED_TIME, Index, build_wheel

REPO = Path(__file__).resolve().parents[2]
BIG_MB = 34   # over envmgr.build.layers.BIG_BYTES (32 MiB): a torch-like distribution with a layer of its own


def build_big_wheel(out_dir: Path, name: str, version: str, mb: int = BIG_MB) -> Path:
    """A wheel whose installed size is over the big-layer threshold (incompressible, yet byte-identical)."""
    module = name.replace("-", "_")
    dist = f"{module}-{version}"
    blob = random.Random(f"{name}-{version}").randbytes(mb << 20)
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
    build_big_wheel(root, "lyr-bighuge", "1.0", mb=BIG_MB + 2)   # larger than bigtorch: its layer goes lower
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

    def build(self, name: str, *extra: str, cache: Path | None = None, verbose: bool = False) -> dict:
        proc = self.envmgr(*(["-v"] if verbose else []), "--json", "build", name, *extra, cache=cache)
        done = [e for e in (json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{"))
                if e.get("event") == "done"][-1]
        done["stderr"] = proc.stderr + proc.stdout
        return done


    def cleanup(self, engine) -> None:
        """Remove this workspace's method images and its caches."""
        for name in self.names:
            for image in engine.images.list(f"envmgr/{name}"):
                try:
                    engine.images.remove(image.id, force=True)
                except Exception:  # noqa: BLE001 - already gone
                    pass
        subprocess.run(["rm", "-rf", str(self.cache_dir), str(self.cache_dir.with_name("cache2"))], check=False)


@pytest.fixture
def methods(tmp_path, store, engine, layer_index):
    ws = Methods(tmp_path, store, layer_index.url)
    yield ws
    ws.cleanup(engine)


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


def test_a_new_large_layer_below_one_the_engine_holds_on_another_chain_builds(methods, engine):
    """As sd-demo's cu128 variant after the default: a new torch layer lowest, then layers the engine holds
    only above the default's torch. They are made again (need_bytes), and the new ones measured in the
    same build still go to the engine from their trees."""
    one = methods.add(["lyr-bigtorch", "lyr-apple==1.0"])
    methods.envmgr("lock", one)
    methods.build(one)
    two = methods.add(["lyr-bighuge", "lyr-bigtorch", "lyr-apple==1.0"])
    methods.envmgr("lock", two)
    done = methods.build(two)
    assert "not in the engine below this image: making them again" in done["stderr"]
    out = engine.containers.run(done["tag"], ["python", "-c", "import lyr_bighuge, lyr_bigtorch; "
                                              "print(lyr_bighuge.VERSION, lyr_bigtorch.VERSION)"],
                                remove=True, network_mode="none")
    assert out.decode().split() == ["1.0", "2.0"]


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
    from envmgr.build.target import target
    from envmgr.build.layers import PHYSICAL_PREFIX
    from envmgr.core import paths
    from envmgr.core.config import load_config
    from envmgr.core.spec import find_method
    from envmgr.core.ui import Reporter
    from envmgr.door.containers import BindMount
    from envmgr.door.context import Context
    from envmgr.images.base import ensure_base
    from envmgr.lock.backends.common import install_requirements_script, run_step, uv_mounts, uv_step_env

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


# ---------------------------------------------------------------------- real wheels: files several claim

CUDA_PAIR = ["nvidia-nvtx-cu12==12.4.127", "nvidia-cuda-runtime-cu12==12.4.127"]   # both ship nvidia/__init__.py
FASTAPI_PAIR = ["fastapi==0.115.0", "fastapi-cli==0.0.5"]                         # both install bin/fastapi


@pytest.fixture(scope="module")
def real_index(tmp_path_factory):
    """Real wheels (pip on the host, its own configuration), served from 127.0.0.1."""
    from tests.support.real_wheels import download_wheels

    root = tmp_path_factory.mktemp("real-wheels")
    download_wheels(root, CUDA_PAIR)
    download_wheels(root, FASTAPI_PAIR, deps=True)
    index = Index(root).start()
    yield index
    index.stop()


@pytest.fixture
def real_methods(tmp_path, store, engine, real_index):
    ws = Methods(tmp_path, store, real_index.url)
    yield ws
    ws.cleanup(engine)


def _env_members(methods: Methods, engine, image: str) -> dict[str, list[str]]:
    """Member name -> the diff IDs of the image's environment layers (kept in the layer store) holding it."""
    found: dict[str, list[str]] = {}
    for diff_id in _layers(engine, image)[1:-1]:
        tar_path = methods.cache_dir / "store" / "layers" / diff_id.split(":", 1)[1]
        assert tar_path.is_file(), "small environment layers stay in the layer store"
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                if not member.isdir():
                    found.setdefault(member.name, []).append(diff_id)
    return found


def test_cuda_wheels_sharing_their_namespace_init_build_with_it_in_one_layer(real_methods, engine):
    name = real_methods.add(CUDA_PAIR)
    real_methods.envmgr("lock", name)
    done = real_methods.build(name, verbose=True)
    members = _env_members(real_methods, engine, done["image"])
    inits = {m: ids for m, ids in members.items() if m.endswith("site-packages/nvidia/__init__.py")}
    assert len(inits) == 1 and len(next(iter(inits.values()))) == 1, inits   # one copy, in one layer
    assert "nvidia/__init__.py (nvidia-cuda-runtime-cu12, nvidia-nvtx-cu12, the same bytes)" in done["stderr"]
    out = engine.containers.run(done["tag"], ["python", "-c", "import nvidia.nvtx, nvidia.cuda_runtime, nvidia; "
                                              "print(nvidia.__file__)"], remove=True, network_mode="none")
    assert out.decode().strip().endswith("site-packages/nvidia/__init__.py")
    # a second method with only one of them: its own layer holds the file again (keys tell the two apart)
    solo = real_methods.add(CUDA_PAIR[:1])
    real_methods.envmgr("lock", solo)
    alone = real_methods.build(solo)
    out = engine.containers.run(alone["tag"], ["python", "-c", "import os, nvidia; "
                                               "print(os.path.isfile(nvidia.__file__ or ''))"],
                                remove=True, network_mode="none")
    assert out.decode().strip() == "True"


def test_two_distributions_installing_one_console_script_build_and_the_first_by_name_wins(real_methods, engine):
    name = real_methods.add(FASTAPI_PAIR)
    real_methods.envmgr("lock", name)
    done = real_methods.build(name)
    assert "bin/fastapi is installed by fastapi, fastapi-cli with different contents: the image holds fastapi's" \
        in done["stderr"]
    members = _env_members(real_methods, engine, done["image"])
    assert len([m for m in members if m.endswith("/bin/fastapi")]) == 1
    assert len(next(ids for m, ids in members.items() if m.endswith("/bin/fastapi"))) == 1
    out = engine.containers.run(done["tag"], ["sh", "-c", "cat \"$(command -v fastapi)\""], remove=True,
                                network_mode="none")
    assert "from fastapi.cli import main" in out.decode()
    # the same bytes from a clean cache (the install race between the two wheels decides nothing)
    again = real_methods.build(name, "--force", cache=real_methods.cache_dir.parent / "cache2")
    assert again["image"] == done["image"]
    subprocess.run(["rm", "-rf", str(real_methods.cache_dir.parent / "cache2")], check=False)


# ---------------------------------------------------------------------- installed files against RECORD


def _cached_copy(uv_cache: Path, wheel: Path, member: str) -> Path:
    """The file uv unpacked from `wheel` into its cache (the one it hard-links into environments)."""
    with zipfile.ZipFile(wheel) as zf:
        data = zf.read(member)
    homes = [a / member for a in (uv_cache / "archive-v0").iterdir()
             if (a / member).is_file() and (a / member).read_bytes() == data]
    assert len(homes) == 1, homes
    return homes[0]


def _envmgr_fails(methods: Methods, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "envmgr", *args], capture_output=True, text=True,
                          env=methods.env(), cwd=REPO, timeout=900)
    assert proc.returncode != 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def test_a_poisoned_file_in_the_uv_cache_fails_the_build_naming_the_distribution(methods, engine, layer_index):
    name = methods.add(["lyr-apple==1.0", "lyr-berry", "lyr-cherry"])
    methods.envmgr("lock", name)
    first = methods.build(name)
    wheel = next(w for w in layer_index.files() if w.name.startswith("lyr_berry-1.0"))
    cached = _cached_copy(methods.cache_dir / "uv", wheel, "lyr_berry/__init__.py")
    cached.write_text("import os\nNAME = 'poisoned'\n")   # as a hostile build step would, between two builds
    subprocess.run(["rm", "-rf", str(methods.cache_dir / "store")], check=True)   # the units install again
    engine.images.remove(first["image"], force=True)
    said = _envmgr_fails(methods, "build", name)
    assert "lyr-berry: " in said and "lyr_berry/__init__.py does not match the hash in its RECORD" in said, said
    assert "Traceback" not in said
    assert not engine.images.list(f"envmgr/{name}")
    assert not (methods.cache_dir / "store" / "index" / "groups").is_dir() or \
        not list((methods.cache_dir / "store" / "index" / "groups").iterdir())   # no layer was stored


def test_a_changed_record_in_the_uv_cache_fails_the_build_once_the_unit_is_known(methods, engine, layer_index):
    """A file changed together with its RECORD row: the RECORD differs from the one the unit's first install left."""
    import base64

    name = methods.add(["lyr-date", "lyr-elder"])
    methods.envmgr("lock", name)
    first = methods.build(name)
    wheel = next(w for w in layer_index.files() if w.name.startswith("lyr_date-1.0"))
    cached = _cached_copy(methods.cache_dir / "uv", wheel, "lyr_date/__init__.py")
    record = _cached_copy(methods.cache_dir / "uv", wheel, "lyr_date-1.0.dist-info/RECORD")
    evil = b"NAME = 'poisoned'\n"
    digest = base64.urlsafe_b64encode(hashlib.sha256(evil).digest()).rstrip(b"=").decode()
    cached.write_bytes(evil)
    record.write_text("".join(f"lyr_date/__init__.py,sha256={digest},{len(evil)}\n" if line.startswith(
        "lyr_date/__init__.py,") else line + "\n" for line in record.read_text().splitlines()))
    # the layers go, the store's records of each distribution stay: the units install again
    subprocess.run(["rm", "-rf", str(methods.cache_dir / "store" / "layers"),
                    str(methods.cache_dir / "store" / "index" / "groups")], check=True)
    engine.images.remove(first["image"], force=True)
    said = _envmgr_fails(methods, "build", name)
    assert "lyr-date: its installed RECORD differs from the one its first install left" in said, said
    assert "Traceback" not in said


FAKE_TORCH = '''
import os, socket

PORT = {port}


def _reach_out():
    """What package code can do when envmgr imports it to read GPU facts."""
    got = []
    for path in (os.environ.get("NETRC", ""), "/opt/envmgr/netrc"):
        try:
            open(path).read()
            got.append("credentials")
        except OSError:
            pass
    try:
        socket.create_connection(("127.0.0.1", PORT), timeout=2).close()
        got.append("network")
    except OSError:
        pass
    try:
        with open(os.path.join(os.path.dirname(__file__), "planted.py"), "w") as fh:
            fh.write("PLANTED = 1\\n")
        got.append("wrote")
    except OSError:
        pass
    return got


REACHED = _reach_out()


class cuda:
    @staticmethod
    def _is_compiled():
        return True

    @staticmethod
    def get_arch_list():
        return ["sm_90"] + ["reached-" + what for what in REACHED]


class _C:
    pass
'''


# what torch 2.x's CUDA wheels hold in torch/lib/libtorch_python.so: the arch flags literal and torch._C's CUDA methods
FLAGS_LIBRARY = (b"\x7fELF\0\0expected sm_80 or newer\0sm_80 sm_90a compute_90\0\0"
                 b"_cuda_getArchFlags\0_cuda_getDeviceCount\0")


def test_gpu_archs_come_from_torchs_library_without_importing_it(tmp_path, store, engine):
    """A torch whose libtorch_python.so holds the arch flags: the install step reads them from its bytes and goes
    on to the split in the same container; torch is never imported (its own arch list would say sm_10)."""
    root = tmp_path / "wheels"
    build_wheel(root, "torch", "2.13.0", body=FAKE_TORCH.format(port=9).replace('["sm_90"]', '["sm_10"]'),
                extra={"torch/lib/libtorch_python.so": FLAGS_LIBRARY, "torch/lib/libtorch_cuda.so": b"\0"})
    index = Index(root).start()
    ws = Methods(tmp_path, store, index.url)
    try:
        name = ws.add(["torch==2.13.0"])
        ws.envmgr("lock", name)
        built = ws.build(name, verbose=True)
        labels = engine.images.get(built["image"]).labels
        assert labels.get("org.envmgr.gpu-archs") == "compute_90,sm_80,sm_90a", labels
        said = built["stderr"]   # the install step's own mark: it read them, and went on to the split
        assert "ENVMGR-PHASE gpu-facts at " in said and "gpu-facts-need-import" not in said
    finally:
        index.stop()
        ws.cleanup(engine)


def test_torch_imported_for_gpu_facts_gets_no_network_no_credentials_and_writes_nothing(tmp_path, store, engine):
    """Reading torch's GPU architectures imports it: package code. It runs in a box of its own, not in the
    install step that has the network, the mirror's netrc and the uv cache (a torch that reaches out here
    would name what it reached in its arch list, which becomes the image's label)."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.settimeout(0.2)
    root = tmp_path / "wheels"
    build_wheel(root, "torch", "2.13.0", body=FAKE_TORCH.format(port=listener.getsockname()[1]))
    index = Index(root, username="builder", password="Gpu-Facts-s3cret").start()
    ws = Methods(tmp_path, store, index.url)   # the credentials reach steps as a netrc
    try:
        name = ws.add(["torch==2.13.0"])
        ws.envmgr("lock", name)
        built = ws.build(name)
        labels = engine.images.get(built["image"]).labels
        assert labels.get("org.envmgr.gpu-archs") == "sm_90", labels
        with pytest.raises(OSError):
            listener.accept()
        found = ("import importlib.util, os; folder = importlib.util.find_spec('torch').submodule_search_locations[0]"
                 "; print(os.path.exists(os.path.join(folder, 'planted.py')))")   # without importing (running) it
        ran = engine.containers.run(built["image"], ["python", "-c", found], remove=True,
                                    network_mode="none").decode().split()
        assert ran[-1] == "False", "nothing the import wrote reached the image"
    finally:
        listener.close()
        index.stop()
        ws.cleanup(engine)
