"""dataset_mode: a run's dataset as given, extracted read-only into the run, or a writable copy."""

import io
import os
import tarfile
import zipfile
from pathlib import Path

import pytest

from envmgr.core.errors import UsageError
from envmgr.core.spec import MethodSpec
from envmgr.runs.datasets import default_mode, prepare_dataset, record

USER = f"{os.getuid()}:{os.getgid()}"


def _spec(builtin: bool = False, **fields) -> MethodSpec:
    spec = MethodSpec(name="third", entry=["bash", "train.sh"], **fields)
    spec.builtin = builtin
    return spec


def _zip(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("pets/metadata.jsonl", '{"images": []}\n')
        zf.writestr("pets/images/1.jpg", "jpg")
        zf.writestr("__MACOSX/pets/._1.jpg", "junk")
        zf.writestr("pets/.DS_Store", "junk")
    return path


def _run(tmp_path: Path) -> tuple[Path, Path]:
    run_dir = tmp_path / "runs" / "third" / "r1"
    (run_dir / "work").mkdir(parents=True)
    return run_dir, run_dir / "work"


def test_default_mode_extracts_archives_for_added_methods_only(tmp_path):
    archive = _zip(tmp_path / "pets.zip")
    folder = tmp_path / "folder"
    folder.mkdir()
    assert default_mode(_spec(), archive) == "extracted"
    assert default_mode(_spec(), folder) == "archive"
    assert default_mode(_spec(builtin=True), archive) == "archive"


def test_extracted_dataset_lands_in_the_run_without_junk_and_never_beside_the_original(tmp_path):
    datasets = tmp_path / "datasets"
    datasets.mkdir()
    archive = _zip(datasets / "pets.zip")
    run_dir, work = _run(tmp_path)
    prepared = prepare_dataset(_spec(), archive, run_dir, work, USER)
    assert prepared.mode == "extracted" and prepared.read_only and prepared.name == "pets"
    assert prepared.path == run_dir / "dataset" / "pets" / "pets"        # the archive's one top folder
    assert sorted(str(p.relative_to(prepared.path)) for p in prepared.path.rglob("*")) == \
        ["images", "images/1.jpg", "metadata.jsonl"]
    assert sorted(p.name for p in datasets.iterdir()) == ["pets.zip"]
    assert record(prepared, run_dir) == {"mode": "extracted", "mounted_at": "/envmgr/data/pets",
                                         "copy": "dataset/pets/pets"}
    (prepared.path / "metadata.jsonl").write_text("kept")              # a resumed run keeps its copy
    again = prepare_dataset(_spec(), archive, run_dir, work, USER, mode="extracted")
    assert (again.path / "metadata.jsonl").read_text() == "kept"


def test_writable_dataset_is_a_copy_in_the_work_dir_the_run_can_write(tmp_path):
    folder = tmp_path / "datasets" / "imgs"
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "1.jpg").write_text("jpg")
    (folder / "images" / "1.jpg").chmod(0o444)
    run_dir, work = _run(tmp_path)
    prepared = prepare_dataset(_spec(dataset_mode="writable"), folder, run_dir, work, USER)
    assert prepared.path == work / "dataset" / "imgs" and not prepared.read_only
    assert (prepared.path / "images" / "1.jpg").stat().st_mode & 0o200
    (prepared.path / "images" / "index.json").write_text("{}")
    assert sorted(p.name for p in (folder / "images").iterdir()) == ["1.jpg"]


def test_archive_mode_mounts_the_file_as_given(tmp_path):
    archive = _zip(tmp_path / "pets.zip")
    run_dir, work = _run(tmp_path)
    prepared = prepare_dataset(_spec(dataset_mode="archive"), archive, run_dir, work, USER)
    assert (prepared.path, prepared.name, prepared.target) == (archive, "pets.zip", "/envmgr/data/pets.zip")
    assert not (run_dir / "dataset").exists()


def test_an_archive_with_a_link_out_is_refused_and_leaves_nothing(tmp_path):
    path = tmp_path / "evil.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        link = tarfile.TarInfo("data/passwd")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
        body = b"x"
        info = tarfile.TarInfo("data/ok.txt")
        info.size = len(body)
        tf.addfile(info, io.BytesIO(body))
    run_dir, work = _run(tmp_path)
    with pytest.raises(UsageError, match="links outside"):
        prepare_dataset(_spec(), path, run_dir, work, USER)
    assert list((run_dir / "dataset").iterdir()) == []


def test_the_dataset_starts_inside_the_folder_zipping_made(tmp_path):
    from envmgr.runs.datasets import dataset_root

    (tmp_path / "a" / "pets" / "images").mkdir(parents=True)
    (tmp_path / "a" / "pets" / "images" / "1.jpg").write_text("x")
    assert dataset_root(tmp_path / "a") == tmp_path / "a" / "pets"
    (tmp_path / "b" / "wrap" / "pets" / "images").mkdir(parents=True)
    (tmp_path / "b" / "wrap" / "pets" / "metadata.jsonl").write_text("{}")
    assert dataset_root(tmp_path / "b") == tmp_path / "b" / "wrap" / "pets"
    (tmp_path / "c" / "shots").mkdir(parents=True)
    (tmp_path / "c" / "shots" / "1.jpg").write_text("x")
    assert dataset_root(tmp_path / "c") == tmp_path / "c" / "shots"
    (tmp_path / "d" / "images").mkdir(parents=True)
    (tmp_path / "d" / "data.jsonl").write_text("{}")
    assert dataset_root(tmp_path / "d") == tmp_path / "d"
