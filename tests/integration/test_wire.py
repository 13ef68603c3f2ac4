"""Sharing layers on the wire: thin exports (`export --thin-for`) and pushes that skip shared layers.

A source server builds `tiny-wire` (a copy of the `tiny` fixture under its own image name) twice: v1,
then v2 with one method file changed, so the two images share every layer but the method layer. A
second method `tiny-wire-b` (same lock, same base) shares the base layer with both. "Other servers"
are fresh base dirs and caches on the same engine and store; what a server's engine lacks is made by
removing this module's own images (never anyone else's).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from tests.integration.conftest import TINY_MAIN, TINY_PYPROJECT, TINY_SPEC, Workspace
from tests.integration.test_transfer import _start_registry
from tests.support.pypi import Index, build_wheel

pytestmark = pytest.mark.engine

NAME = "tiny-wire"
NAME_B = "tiny-wire-b"
REPOS = (f"envmgr/{NAME}", f"envmgr/{NAME_B}")


def _done(proc) -> dict:
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"event": "done"')][-1]


# A distribution only this module's methods lock: environment layers are shared by content across
# methods (one prefix), so without it every environment layer of `tiny-wire` would also be held by
# the other modules' `tiny` images, and no removal of this module's images could make one go missing.
ONLY_HERE = "envmgr-wireonly"


@pytest.fixture(scope="module")
def wire_mirror(tmp_path_factory, wheels):
    """mirror A's wheels plus one that only this module's methods depend on."""
    root = tmp_path_factory.mktemp("wire-wheels")
    for wheel in wheels.glob("*.whl"):
        shutil.copy2(wheel, root / wheel.name)
    build_wheel(root, ONLY_HERE, "1.0", body='WIRE = "only here"\n')
    index = Index(root).start()
    yield index
    index.stop()


def _add_method(ws: Workspace, name: str, main: str = TINY_MAIN) -> None:
    folder = ws.base_dir / "methods" / name
    folder.mkdir(parents=True)
    (folder / "envmgr.toml").write_text(TINY_SPEC.replace('name = "tiny"', f'name = "{name}"'))
    pyproject = TINY_PYPROJECT.replace("dependencies = [", f'dependencies = ["{ONLY_HERE}>=1.0", ', 1)
    (folder / "pyproject.toml").write_text(pyproject)
    (folder / "main.py").write_text(main)


def _drop(engine, image_id: str) -> None:
    """Remove one of this module's images (every tag), if it is there."""
    import docker.errors

    try:
        engine.images.remove(image_id, force=True)
    except docker.errors.ImageNotFound:
        pass


def _layers(engine, image_id: str) -> list[str]:
    return engine.api.inspect_image(image_id)["RootFS"]["Layers"]


def _has(engine, image_id: str) -> bool:
    import docker.errors

    try:
        engine.api.inspect_image(image_id)
        return True
    except docker.errors.ImageNotFound:
        return False


def _server(root: Path, store: Path) -> Workspace:
    ws = Workspace(root / "base", root / "cache", store)
    ws.method_dir = root / "base" / "methods" / NAME
    return ws


@pytest.fixture(scope="module")
def source(tmp_path_factory, store, engine, wire_mirror):
    """tiny-wire v1 built and exported (full), then v2 (main.py changed) built: both images in the engine."""
    root = tmp_path_factory.mktemp("wire-source")
    ws = _server(root, store)
    _add_method(ws, NAME)
    ws.envmgr("lock", NAME, mirror=wire_mirror.url)
    ws.v1 = _done(ws.envmgr("--json", "build", NAME, mirror=wire_mirror.url))
    ws.v1_archive = root / "v1.envmgr.tar"
    ws.envmgr("export", NAME, "-o", str(ws.v1_archive))
    (ws.method_dir / "main.py").write_text(TINY_MAIN + "print('v2')\n")
    ws.v2 = _done(ws.envmgr("--json", "build", NAME, mirror=wire_mirror.url))
    ws.full = root / "v2.envmgr.tar"
    ws.envmgr("export", NAME, "-o", str(ws.full))
    yield ws
    for repo in REPOS:
        for image in engine.images.list(repo):
            _drop(engine, image.id)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("wire-keys")
    for who in ("site", "attacker"):
        Workspace(root, root / "cache", root).envmgr("key", "generate", str(root / who))
    return {"site": root / "site", "attacker": root / "attacker"}


@pytest.fixture(scope="module")
def thin(source, keys) -> dict:
    """v2 exported thin for v1's image (by ID), for v1's archive file, and signed."""
    root = source.full.parent
    found = {"by_id": root / "thin-id.tar", "by_file": root / "thin-file.tar", "signed": root / "thin-signed.tar"}
    found["done"] = _done(source.envmgr("--json", "export", NAME, "-o", str(found["by_id"]),
                                        "--thin-for", source.v1["image"]))
    source.envmgr("export", NAME, "-o", str(found["by_file"]), "--thin-for", str(source.v1_archive))
    source.envmgr("export", NAME, "-o", str(found["signed"]), "--thin-for", source.v1["image"],
                  "--sign", str(keys["site"]))
    return found


def _export_json(archive: Path) -> dict:
    with tarfile.open(archive) as tar:
        return json.loads(tar.extractfile("envmgr/export.json").read())


def _strict(keys) -> dict[str, str]:
    return {"ENVMGR_TRUST_KEYS": f"{keys['site']}.pub", "ENVMGR_TRUST_REQUIRE_SIGNATURE": "true"}


# ----------------------------------------------------------------------------- export


def test_thin_export_leaves_out_the_shared_layers_and_is_much_smaller(source, thin, engine):
    v2_layers = _layers(engine, source.v2["image"])
    assert _layers(engine, source.v1["image"])[:-1] == v2_layers[:-1], "v1 and v2 differ only in the method layer"
    manifest = _export_json(thin["by_id"])
    assert manifest["format"] == "envmgr-export/2+thin"
    assert [e["diff_id"] for e in manifest["left_out"]] == v2_layers[:-1]
    assert manifest["thin_for"] == {"image_id": source.v1["image"]}
    with tarfile.open(thin["by_id"]) as tar:
        carried = [n for n in tar.getnames() if n.endswith("/layer.tar")]
    assert carried == [f"{v2_layers[-1].split(':')[1]}/layer.tar"], "only the method layer travels"
    full, small = source.full.stat().st_size, thin["by_id"].stat().st_size
    print(f"\nv2 archive: full {full} bytes, thin for v1 {small} bytes ({full / small:.0f}x smaller)")
    assert small * 10 < full
    assert thin["done"]["left_out"] == len(v2_layers) - 1 and thin["done"]["bytes"] == small
    # the target named by its archive file gives the same archive, byte for byte
    assert thin["by_file"].read_bytes() == thin["by_id"].read_bytes()


def test_thin_export_as_squashfs_is_refused(source, tmp_path):
    proc = source.envmgr("export", NAME, "--format", "squashfs", "-o", str(tmp_path / "x.sqsh"),
                         "--thin-for", source.v1["image"], check=False)
    assert proc.returncode == 2 and "--thin-for works with --format envmgr only" in proc.stderr, proc.stderr
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- import


def _forge_left_out(archive: Path, out: Path, change) -> None:
    """Edit export.json's left_out list (nothing else), keeping every other member as it is."""
    with tarfile.open(archive) as src, tarfile.open(out, "w", format=tarfile.GNU_FORMAT) as dst:
        for info in src.getmembers():
            body = src.extractfile(info).read() if info.isfile() else None
            if info.name == "envmgr/export.json":
                manifest = json.loads(body)
                change(manifest)
                body = json.dumps(manifest, indent=1, sort_keys=True).encode()
                info.size = len(body)
            dst.addfile(info, io.BytesIO(body) if body is not None else None)


def test_forged_thin_archives_are_refused_and_nothing_is_loaded(source, thin, keys, engine, tmp_path, store):
    _drop(engine, source.v2["image"])   # the chain under it stays (v1 has it): only the edits can be refused
    v2_layers = _layers(engine, source.v1["image"])[:-1]
    dest = _server(tmp_path / "dest", store)
    # the signed list with its first entry dropped: the signature no longer matches
    shortened = tmp_path / "shortened.tar"
    _forge_left_out(thin["signed"], shortened, lambda m: m["left_out"].pop(0))
    proc = dest.envmgr("import", str(shortened), check=False, **_strict(keys))
    assert proc.returncode == 2 and "signature does not match" in proc.stderr, proc.stderr
    # unsigned and not required: the list must still account for every layer of the image
    unsigned = tmp_path / "unsigned.tar"
    _forge_left_out(thin["by_id"], unsigned, lambda m: m["left_out"].pop())
    proc = dest.envmgr("import", str(unsigned), check=False)
    assert proc.returncode == 2 and f"layer {v2_layers[-1].split(':')[1][:12]} is neither in the archive" \
        in proc.stderr, proc.stderr
    # a thin archive relabelled as full
    relabelled = tmp_path / "relabelled.tar"
    _forge_left_out(thin["by_id"], relabelled, lambda m: m.update(format="envmgr-export/2"))
    proc = dest.envmgr("import", str(relabelled), check=False)
    assert proc.returncode == 2 and "a full archive with a left_out list" in proc.stderr, proc.stderr
    assert not _has(engine, source.v2["image"])
    assert not (dest.base_dir / "methods" / NAME).exists()


def test_thin_import_where_the_engine_has_the_layers_gives_the_same_image(source, thin, keys, engine, tmp_path,
                                                                        store):
    _drop(engine, source.v2["image"])   # v1 stays: it holds the left-out chain
    dest = _server(tmp_path / "dest", store)
    done = _done(dest.envmgr("--json", "import", str(thin["signed"]), **_strict(keys)))
    assert done["image_id"] == source.v2["image"] and done["loaded"] and done["tag"] == source.v2["tag"]
    assert engine.api.inspect_image(source.v2["tag"])["Id"] == source.v2["image"]
    assert (dest.base_dir / "methods" / NAME / "main.py").read_text().endswith("print('v2')\n")
    verified = _done(dest.envmgr("--json", "verify", NAME, "--no-rebuild", **_strict(keys)))
    assert verified["signature"]["state"] == "trusted" and verified["signature"]["layers_match"], verified


def _blob_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in (root / "data").rglob("*") if p.is_file())


def test_push_of_a_second_method_uploads_only_its_own_layers(source, engine, tmp_path, wire_mirror):
    """Method A (tiny-wire v2), then method B (tiny-wire-b: same base, its own environment and method
    layers): the registry grows by B's own layers only; the shared base is not sent again."""
    _add_method(source, NAME_B)
    source.envmgr("lock", NAME_B, mirror=wire_mirror.url)
    built_b = _done(source.envmgr("--json", "build", NAME_B, mirror=wire_mirror.url))
    if not _has(engine, source.v2["image"]):
        source.envmgr("build", NAME, mirror=wire_mirror.url)
    shared = set(_layers(engine, source.v2["image"])) & set(_layers(engine, built_b["image"]))
    assert shared, "A and B share their base layer"
    proc, registry = _start_registry(tmp_path / "registry")
    try:
        before = _blob_bytes(tmp_path / "registry")
        pushed_a = _done(source.envmgr("--json", "push", NAME, registry))
        grown_a = _blob_bytes(tmp_path / "registry") - before
        pushed_b = _done(source.envmgr("--json", "push", NAME_B, registry))
        grown_b = _blob_bytes(tmp_path / "registry") - before - grown_a
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    size_a = engine.api.inspect_image(source.v2["image"])["Size"]
    size_b = engine.api.inspect_image(built_b["image"])["Size"]
    print(f"\npush A ({size_a} bytes image): registry grew {grown_a} bytes, {pushed_a['layers_pushed']} layers "
          f"uploaded; push B ({size_b} bytes image): registry grew {grown_b} bytes, {pushed_b['layers_pushed']} "
          f"uploaded, {pushed_b['layers_existing']} already there, {pushed_b['bytes_read']} bytes read")
    assert pushed_a["layers_existing"] == 0 and pushed_a["layers_pushed"] == len(_layers(engine, source.v2["image"]))
    assert pushed_b["layers_existing"] == len(shared)
    assert pushed_b["layers_pushed"] == len(_layers(engine, built_b["image"])) - len(shared)
    assert grown_b * 10 < size_b, "B's upload is far smaller than its image"
    assert grown_b * 5 < grown_a


def test_thin_import_is_refused_naming_the_missing_layers_when_the_engine_lacks_them(source, thin, engine,
                                                                                    tmp_path, store):
    """Runs last: it removes every image that holds the environment layer's chain (this module's own)."""
    for repo in REPOS:
        for image in engine.images.list(repo):
            _drop(engine, image.id)
    left = _export_json(thin["by_id"])["left_out"]
    env = [e for e in left if "environment" in e["history"]]
    held = {layer for image in engine.images.list() for layer in image.attrs["RootFS"]["Layers"]}
    # environment layers are shared by content: those no other image holds (the one with
    # envmgr-wireonly at least) are surely missing now; the engine also lacks the ones above them in
    # this chain (a layer is reused only with the same layers below it), so those may be named too
    missing = [e for e in env if e["diff_id"] not in held]
    assert missing, left
    dest = _server(tmp_path / "dest", store)
    proc = dest.envmgr("import", str(thin["by_id"]), check=False)
    assert proc.returncode == 2, proc.stderr
    message = " ".join(proc.stderr.split())
    assert "whose left-out layers this engine lacks" in message and "nothing was loaded" in message, message
    for entry in missing:
        assert entry["diff_id"].split(":")[1][:12] in message and entry["history"] in message, entry
    base = left[0]["diff_id"].split(":")[1][:12]
    assert base not in message, "the base layer is here (the base image holds it): not named"
    assert not _has(engine, source.v2["image"]) and not _has(engine, source.v1["image"])
    assert not (dest.base_dir / "methods" / NAME).exists()
    methods = dest.base_dir / "methods"
    assert not methods.exists() or not os.listdir(methods), "nothing staged, nothing registered"
