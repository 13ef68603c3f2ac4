import hashlib
import io
import os
import tarfile

from envmgr.images.image import EPOCH, ExtraFile, ImageConfig, tree_hash, write_archive, write_layer


def _tree(root, mtime):
    (root / "pkg" / "sub").mkdir(parents=True)
    (root / "pkg" / "b.py").write_text("b = 1\n")
    (root / "pkg" / "a.py").write_text("a = 1\n")
    (root / "pkg" / "run").write_text("#!/bin/sh\n")
    (root / "pkg" / "run").chmod(0o755)
    (root / "pkg" / "link").symlink_to("a.py")
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            os.utime(path, (mtime, mtime))


def test_layer_bytes_do_not_depend_on_mtimes_or_creation_order(tmp_path):
    _tree(tmp_path / "one", 1_600_000_000)
    _tree(tmp_path / "two", 1_700_000_000)
    first = write_layer(tmp_path / "one.tar", [(tmp_path / "one", "/opt/x")], [ExtraFile("etc/x.json", b"{}")])
    second = write_layer(tmp_path / "two.tar", [(tmp_path / "two", "/opt/x")], [ExtraFile("etc/x.json", b"{}")])
    assert first.diff_id == second.diff_id
    assert (tmp_path / "one.tar").read_bytes() == (tmp_path / "two.tar").read_bytes()
    with tarfile.open(tmp_path / "one.tar") as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names) and "opt" in names and "opt/x/pkg/link" in names
    assert all(m.mtime == EPOCH and m.uid == 0 and m.gid == 0 and m.uname == "" for m in members)
    assert next(m for m in members if m.name == "opt/x/pkg/run").mode == 0o755
    assert "sha256:" + hashlib.sha256((tmp_path / "one.tar").read_bytes()).hexdigest() == first.diff_id


def test_image_id_is_the_config_digest_and_archive_is_deterministic(tmp_path):
    _tree(tmp_path / "t", 1)
    layer = write_layer(tmp_path / "l.tar", [(tmp_path / "t", "/opt")])
    config = ImageConfig(layers=[layer], env={"A": "1"}, cmd=["python"], labels={"k": "v"}, history=["x"])
    archives = []
    for _ in range(2):
        out = io.BytesIO()
        image_id = write_archive(out, config, ["envmgr/t:1"])
        archives.append(out.getvalue())
    assert archives[0] == archives[1]
    assert image_id == "sha256:" + hashlib.sha256(config.to_bytes()).hexdigest()
    assert b'"created":"2000-01-01T00:00:00Z"' in config.to_bytes()


def test_tree_hash_changes_with_content_and_exec_bit(tmp_path):
    _tree(tmp_path / "t", 1)
    before = tree_hash(tmp_path / "t")
    (tmp_path / "t" / "pkg" / "a.py").chmod(0o755)
    assert tree_hash(tmp_path / "t") != before
    assert tree_hash(tmp_path / "t", exclude=lambda rel: rel.endswith("a.py")) != before
