"""A layer or image archive described as pieces (header bytes + file references) is byte for byte the tar
envmgr writes: the engine loader sends those pieces by sendfile, so any drift would change diff IDs."""

import hashlib
import io
import os

import pytest

from envmgr.images.image import ExtraFile, ImageConfig, archive_pieces, hash_pieces, layer_entries, layer_pieces, measure_layer, pieces_size, write_archive, write_layer, write_pieces


def _awkward_tree(root):
    """Names past tar's 100-character field, a long link target, empty files, sizes on and off 512-byte
    blocks, an executable, an empty folder, a symlink, non-ASCII names."""
    site = root / "lib" / "python3.11" / "site-packages"
    deep = site / ("a-rather-long-package-name-" * 3) / "sub" / ("module_with_a_long_name_" * 3)
    deep.mkdir(parents=True)
    (deep / "__init__.py").write_text("X = 1\n")
    (site / "empty.txt").write_bytes(b"")
    (site / "block.bin").write_bytes(b"b" * 1024)
    (site / "odd.bin").write_bytes(os.urandom(70_001))
    (site / "tool").write_bytes(b"#!/bin/sh\n")
    (site / "tool").chmod(0o755)
    (site / "empty-folder").mkdir()
    (site / "héllo.py").write_text("Y = 2\n")
    (site / "link").symlink_to("x" * 150)
    return [(root, "/opt/envmgr/envs/.shared")]


def test_layer_pieces_are_the_bytes_write_layer_writes(tmp_path):
    trees = _awkward_tree(tmp_path / "tree")
    extras = [ExtraFile("usr/local/bin/conda", b"#!/bin/sh\necho shim\n", 0o755),
              ExtraFile("opt/envmgr/envs/m", b"", 0o777, link="../envs/.shared")]
    written = write_layer(tmp_path / "layer.tar", trees=trees, extra_files=extras)
    pieces = layer_pieces(layer_entries(trees, extras))
    out = io.BytesIO()
    write_pieces(out, pieces)
    assert out.getvalue() == written.path.read_bytes()
    assert pieces_size(pieces) == written.size
    assert "sha256:" + hash_pieces(pieces)[0] == written.diff_id


def test_a_measured_layer_has_the_written_layers_digest_without_a_tar(tmp_path):
    trees = _awkward_tree(tmp_path / "tree")
    written = write_layer(tmp_path / "layer.tar", trees=trees)
    seen = []
    measured = measure_layer(trees, tmp_path / "absent.tar", progress=seen.append)
    assert (measured.diff_id, measured.size) == (written.diff_id, written.size)
    assert sum(seen) == 1024 + 70_001 + len("X = 1\n") + len("Y = 2\n") + len("#!/bin/sh\n")


def test_archive_pieces_are_the_archive_write_archive_writes(tmp_path):
    trees = _awkward_tree(tmp_path / "tree")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "f.txt").write_text("other\n")
    on_disk = write_layer(tmp_path / "base.tar", trees=[(tmp_path / "other", "/srv")])
    measured = measure_layer(trees, tmp_path / "absent.tar")
    config = ImageConfig(layers=[on_disk, measured, on_disk], labels={"k": "v"}, history=["a", "b", "c"])
    for present in (frozenset(), frozenset({on_disk.diff_id})):
        expected = io.BytesIO()
        image_id = write_archive(expected, config, ["x/y:z"], present=present)
        got = io.BytesIO()
        pieces = archive_pieces(config, ["x/y:z"], present)
        write_pieces(got, pieces)
        assert got.getvalue() == expected.getvalue()
        assert pieces_size(pieces) == len(expected.getvalue())
        assert image_id == config.image_id() == "sha256:" + hashlib.sha256(config.to_bytes()).hexdigest()


def test_a_tree_changed_after_it_was_measured_is_refused_before_anything_is_sent(tmp_path):
    trees = _awkward_tree(tmp_path / "tree")
    measured = measure_layer(trees, tmp_path / "absent.tar")
    (tmp_path / "tree" / "lib" / "python3.11" / "site-packages" / "grown.bin").write_bytes(b"g" * 4096)
    with pytest.raises(OSError, match="changed after it was measured"):
        archive_pieces(ImageConfig(layers=[measured]), [])


def test_a_file_that_shrank_after_it_was_described_fails_the_write(tmp_path):
    trees = _awkward_tree(tmp_path / "tree")
    pieces = layer_pieces(layer_entries(trees))
    (tmp_path / "tree" / "lib" / "python3.11" / "site-packages" / "odd.bin").write_bytes(b"short")
    with pytest.raises(OSError, match="shorter than"):
        write_pieces(io.BytesIO(), pieces)
    with pytest.raises(OSError, match="shorter than"):
        hash_pieces(pieces)
