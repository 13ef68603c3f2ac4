"""The offline tools that tests and demos build on."""

from __future__ import annotations

from pathlib import Path


def test_tiny_model_is_deterministic(tmp_path):
    import hashlib

    import make_tiny_model

    def digest(folder: Path) -> str:
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        return hashlib.sha256(b"".join(p.relative_to(folder).as_posix().encode() + p.read_bytes() for p in files)).hexdigest()

    make_tiny_model.main([str(tmp_path / "a")])
    make_tiny_model.main([str(tmp_path / "b")])
    assert digest(tmp_path / "a") == digest(tmp_path / "b")


def test_sample_dataset_has_jsonl_txt_captions_and_macos_junk(tmp_path):
    import zipfile

    import make_sample_dataset

    archive = make_sample_dataset.write_dataset(tmp_path / "d.zip", count=6, size=32)
    names = zipfile.ZipFile(archive).namelist()
    assert any(n.endswith(".jsonl") for n in names) and any(n.endswith(".txt") for n in names)
    assert any(n.startswith("__MACOSX/") for n in names) and any(n.endswith(".DS_Store") for n in names)
