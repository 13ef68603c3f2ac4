"""The environment is not kept twice: stored layers handed to the engine, and read back (no engine)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

from envmgr.build.layer_bytes import save_layers
from envmgr.build.layers import LayerStore
from envmgr.images.image import tarinfo


def _store_with_layer(tmp_path, size: int) -> tuple[LayerStore, str]:
    store = LayerStore(tmp_path / "store")
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "blob.bin").write_bytes(b"x" * size)
    layer = store.put_group("big-key", [(tree, "/opt/envmgr/envs/.shared")])
    return store, layer.diff_id


def test_released_layer_stays_known_without_its_bytes(tmp_path):
    store, diff_id = _store_with_layer(tmp_path, 40_000)
    freed = store.release([diff_id], at_least=1)
    assert freed > 40_000
    assert not store.layer_path(diff_id).exists()
    layer = store.group("big-key")
    assert layer is not None and layer.diff_id == diff_id and not layer.path.exists()
    # when the engine lacks it where an image needs it, the build must make it again
    assert store.group("big-key", need_bytes=frozenset({diff_id})) is None
    # making it again writes a fresh, unreleased record
    tree = tmp_path / "tree"
    again = store.put_group("big-key", [(tree, "/opt/envmgr/envs/.shared")])
    assert again.diff_id == diff_id and again.path.is_file()
    assert store.group("big-key", need_bytes=frozenset({diff_id})) is not None


def test_small_layers_keep_their_bytes(tmp_path):
    store, diff_id = _store_with_layer(tmp_path, 1000)
    assert store.release([diff_id]) == 0          # under RELEASE_BYTES: kept for fast pin bumps
    assert store.layer_path(diff_id).is_file()
    record = json.loads(next((tmp_path / "store" / "index" / "groups").glob("*.json")).read_text())
    assert not record.get("released")


def test_a_lost_file_without_release_is_made_again(tmp_path):
    store, diff_id = _store_with_layer(tmp_path, 1000)
    store.layer_path(diff_id).unlink()
    assert store.group("big-key") is None


def _docker_save(layers: dict[str, bytes], oci: bool) -> bytes:
    """A `docker save` stream as the engine writes it: legacy `<id>/layer.tar` or OCI `blobs/sha256/<hex>`."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for index, data in enumerate(layers.values()):
            name = f"blobs/sha256/{hashlib.sha256(data).hexdigest()}" if oci else f"{index:064x}/layer.tar"
            tar.addfile(tarinfo(name, tarfile.REGTYPE, 0o644, len(data)), io.BytesIO(data))
            tar.addfile(tarinfo(f"{index:064x}/json", tarfile.REGTYPE, 0o644, 2), io.BytesIO(b"{}"))
        tar.addfile(tarinfo("manifest.json", tarfile.REGTYPE, 0o644, 2), io.BytesIO(b"[]"))
    return out.getvalue()


def _chunks(data: bytes, size: int = 7777):
    for start in range(0, len(data), size):
        yield data[start:start + size]


def test_save_layers_picks_the_wanted_layers_by_hash(tmp_path):
    for oci in (False, True):
        into = tmp_path / ("oci" if oci else "legacy")
        into.mkdir()
        layers = {"a": b"A" * 5000, "b": b"B" * 7000, "c": b"C" * 5000}   # a and c share a size
        ids = {k: "sha256:" + hashlib.sha256(v).hexdigest() for k, v in layers.items()}
        found = save_layers(_chunks(_docker_save(layers, oci)), {ids["c"]: 5000, ids["b"]: 7000}, into)
        assert set(found) == {ids["b"], ids["c"]}
        assert found[ids["c"]].read_bytes() == layers["c"]
        assert sorted(p.name for p in into.iterdir()) == sorted(i.split(":")[1] for i in (ids["b"], ids["c"]))


def test_save_layers_never_returns_bytes_of_another_digest(tmp_path):
    layers = {"a": b"A" * 5000}
    wanted = {"sha256:" + "0" * 64: 5000}   # same size, other content: a damaged or different layer
    assert save_layers(_chunks(_docker_save(layers, False)), wanted, tmp_path) == {}
    assert list(tmp_path.iterdir()) == []


def test_gc_drops_second_copies_and_records_of_layers_gone_from_the_engine(tmp_path):
    from types import SimpleNamespace

    from envmgr.gc import gc

    store = LayerStore(tmp_path / "store")
    trees = {}
    for name, size in (("big", 40 << 20), ("small", 1000), ("gone", 40 << 20)):
        tree = tmp_path / name
        tree.mkdir()
        (tree / "f.bin").write_bytes(name.encode() * (size // len(name)))
        trees[name] = store.put_group(name, [(tree, "/opt/x")]).diff_id
    store.release([trees["gone"]])                      # handed to the engine, which then lost it
    ctx = SimpleNamespace(cache_dir=tmp_path)
    plan = gc.Plan()
    gc._plan_store(ctx, plan, used={trees["big"], trees["small"]})
    kinds = {(item.kind, item.what.rsplit("/", 1)[-1]) for item in plan.remove}
    assert ("layer-copy", trees["big"].split(":")[1]) in kinds           # kept in the engine: drop our copy
    assert not any(trees["small"].split(":")[1] in what for _, what in kinds)
    assert ("layer", "gone.json") in kinds                               # a record of bytes nowhere
    done = gc.apply(SimpleNamespace(cache_dir=tmp_path, engine=None), plan)
    assert len(done.remove) == len(plan.remove)
    assert not store.layer_path(trees["big"]).exists()
    assert store.group("big") is not None           # still known: its record stays, marked released
    assert store.group("small") is not None and store.layer_path(trees["small"]).is_file()
    assert store.group("gone") is None


def _site_tree(root):
    site = root / "lib" / "python3.11" / "site-packages"
    (site / "pkg").mkdir(parents=True)
    (site / "pkg" / "__init__.py").write_text("X = 1\n")
    (site / "pkg" / "data.bin").write_bytes(bytes(range(256)) * 500)
    info = site / "pkg-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pkg\nVersion: 1.0\n")
    (info / "RECORD").write_text("pkg/__init__.py,,\n")
    (root / "bin").mkdir()
    (root / "bin" / "tool").symlink_to("../lib/python3.11/site-packages/pkg/__init__.py")
    return [(root, "/opt/envmgr/envs/.shared")]


def test_a_measured_layer_is_the_written_one_made_again_from_its_trees(tmp_path):
    import pytest

    from envmgr.build.contents import layer_facts, tree_layer_facts
    from envmgr.images.image import measure_layer, open_layer, write_layer

    trees = _site_tree(tmp_path / "tree")
    written = write_layer(tmp_path / "written.tar", trees=trees)
    measured = measure_layer(trees, tmp_path / "absent.tar")
    assert (measured.diff_id, measured.size) == (written.diff_id, written.size)
    assert not measured.path.exists()
    with open_layer(measured) as fh:
        assert fh.read(written.size) == written.path.read_bytes()
    assert tree_layer_facts(trees) == layer_facts(written.path)
    assert tree_layer_facts(trees)["metadata"]
    # a tree changed after it was measured never passes for the measured layer
    (tmp_path / "tree" / "lib" / "python3.11" / "site-packages" / "pkg" / "__init__.py").write_text("X = 2\n")
    with pytest.raises(OSError, match="changed after it was measured"):
        with open_layer(measured) as fh:
            while fh.read(1 << 16):
                pass


def test_a_tree_that_grew_after_it_was_measured_fails_the_read(tmp_path):
    import pytest

    from envmgr.images.image import measure_layer, open_layer

    trees = _site_tree(tmp_path / "tree")
    measured = measure_layer(trees, tmp_path / "absent.tar")
    (tmp_path / "tree" / "lib" / "python3.11" / "site-packages" / "pkg" / "more.bin").write_bytes(b"m" * 100_000)
    with pytest.raises(OSError):
        with open_layer(measured) as fh:
            left = measured.size
            while left > 0 and (chunk := fh.read(min(left, 1 << 16))):
                left -= len(chunk)
