"""Dataset preparation: archive shapes, JSONL shapes, caption sources, safety rules, bad input."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import make_sample_dataset
import pytest
from PIL import Image
from sd_trainer.dataset_prep import DatasetError, Limits, prepare_dataset


def png_bytes(colour=(200, 30, 30), size=32, fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format=fmt)
    return buffer.getvalue()


def make_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return path


def prepare(source: Path, tmp_path: Path, **limits):
    out = tmp_path / "prepared"
    report = prepare_dataset(source, out, tmp_path / "scratch", Limits(**limits) if limits else Limits())
    captions = {p.stem: p.read_text().strip() for p in out.glob("*.txt")}
    return report, captions, out


def record(image: str, caption: str | None = None) -> str:
    entry = {"imageId": image, "qa": []}
    if caption is not None:
        entry["generation"] = caption
    return json.dumps({"images": [entry]})


@pytest.mark.parametrize("fmt", ["zip", "tar.gz", "dir"])
def test_each_container_format_gives_the_same_dataset(tmp_path, fmt):
    source = make_sample_dataset.write_dataset(tmp_path / f"data.{fmt}", fmt, count=6, size=32, top_folder="x/y")
    report, captions, out = prepare(source, tmp_path)
    assert report.images == 6
    assert report.captions_from_jsonl > 0 and report.captions_from_txt > 0
    assert report.captions_from_jsonl + report.captions_from_txt == 6
    assert all(caption for caption in captions.values())
    assert not any(p.name.startswith("._") or p.name == ".DS_Store" for p in out.iterdir())


def test_images_nested_deep_with_upper_case_extensions(tmp_path):
    files = {
        "a/b/c/output.jsonl": (record("ONE.JPG", "first") + "\n" + record("two.PNG", "second") + "\n").encode(),
        "a/b/c/images/ONE.JPG": png_bytes(fmt="JPEG"),
        "a/b/c/images/two.PNG": png_bytes(),
    }
    report, captions, out = prepare(make_zip(tmp_path / "d.zip", files), tmp_path)
    assert captions == {"ONE": "first", "two": "second"}
    assert {p.suffix for p in out.glob("*") if p.suffix != ".txt" and p.suffix != ".json"} == {".jpg", ".png"}


@pytest.mark.parametrize("jsonl_name", ["metadata.jsonl", "output.jsonl", "data.jsonl", "captions_v2.jsonl"])
def test_any_single_jsonl_name_is_accepted(tmp_path, jsonl_name):
    files = {jsonl_name: (record("a.jpg", "cap a") + "\n").encode(), "images/a.jpg": png_bytes(fmt="JPEG")}
    report, captions, _ = prepare(make_zip(tmp_path / "d.zip", files), tmp_path)
    assert report.jsonl == jsonl_name and captions == {"a": "cap a"}


def test_caption_at_top_level_beside_an_image_pair(tmp_path):
    line = {"images": [{"imageId": "a.png"}, {"imageId": "b.png"}], "generation": "shared caption"}
    files = {"metadata.jsonl": json.dumps(line).encode(), "images/a.png": png_bytes(), "images/b.png": png_bytes()}
    _, captions, _ = prepare(make_zip(tmp_path / "d.zip", files), tmp_path)
    assert captions == {"a": "shared caption", "b": "shared caption"}


def test_flat_records_with_file_name_and_text_keys(tmp_path):
    lines = [{"file_name": "images/a.png", "text": "alpha"}, {"image": "b.png", "caption": ["tag1", "tag2"]}]
    files = {"meta.jsonl": "\n".join(json.dumps(x) for x in lines).encode(),
             "images/a.png": png_bytes(), "images/b.png": png_bytes()}
    _, captions, _ = prepare(make_zip(tmp_path / "d.zip", files), tmp_path)
    assert captions == {"a": "alpha", "b": "tag1, tag2"}


def test_jsonl_caption_wins_over_txt_and_txt_fills_gaps(tmp_path):
    files = {
        "metadata.jsonl": (record("a.png", "from jsonl") + "\n" + record("b.png") + "\n").encode(),
        "images/a.png": png_bytes(), "images/a.txt": b"from txt a",
        "images/b.png": png_bytes(), "images/b.txt": b"from txt b",
    }
    _, captions, _ = prepare(make_zip(tmp_path / "d.zip", files), tmp_path)
    assert captions == {"a": "from jsonl", "b": "from txt b"}


def test_annotation_only_jsonl_without_any_caption_is_an_error_naming_images(tmp_path):
    line = {"images": [{"imageId": "a.png", "qa": [{"question": "q", "answer": "a"}], "boxes": [[0, 0, 1, 1]]}]}
    files = {"metadata.jsonl": json.dumps(line).encode(), "images/a.png": png_bytes()}
    with pytest.raises(DatasetError, match=r"caption.*a\.png"):
        prepare(make_zip(tmp_path / "d.zip", files), tmp_path)


def test_images_without_caption_are_skipped_and_reported(tmp_path):
    files = {"metadata.jsonl": record("a.png", "cap").encode(), "images/a.png": png_bytes(), "images/lonely.png": png_bytes()}
    report, captions, _ = prepare(make_zip(tmp_path / "d.zip", files), tmp_path)
    assert list(captions) == ["a"]
    assert report.skipped["no_caption"] == 1 and "images/lonely.png" in report.examples["no_caption"]
    assert any("lonely.png" in warning for warning in report.warnings)


def test_bad_jsonl_line_reports_its_line_number(tmp_path):
    text = record("a.png", "ok") + "\n\n" + '{"images": [ broken\n'
    files = {"metadata.jsonl": text.encode(), "images/a.png": png_bytes()}
    with pytest.raises(DatasetError, match=r"metadata\.jsonl line 3"):
        prepare(make_zip(tmp_path / "d.zip", files), tmp_path)


def test_jsonl_line_naming_no_image_is_an_error(tmp_path):
    files = {"metadata.jsonl": b'{"generation": "caption but no image"}\n', "images/a.png": png_bytes()}
    with pytest.raises(DatasetError, match="line 1: names no image"):
        prepare(make_zip(tmp_path / "d.zip", files), tmp_path)


def test_truncated_and_garbage_images_are_skipped_and_counted(tmp_path):
    good = png_bytes(fmt="JPEG")
    files = {"images/good.jpg": good, "images/good.txt": b"g", "images/cut.jpg": good[: len(good) // 2],
             "images/cut.txt": b"c", "images/noise.png": b"not an image", "images/noise.txt": b"n"}
    report, captions, _ = prepare(make_zip(tmp_path / "d.zip", files), tmp_path)
    assert list(captions) == ["good"] and report.skipped["unreadable"] == 2


def test_all_images_unreadable_is_an_error(tmp_path):
    files = {"images/a.png": b"junk", "images/a.txt": b"cap"}
    with pytest.raises(DatasetError, match="unreadable"):
        prepare(make_zip(tmp_path / "d.zip", files), tmp_path)


def test_only_macos_junk_is_an_error(tmp_path):
    files = {"__MACOSX/images/._a.png": b"x", "images/._a.png": b"x", ".DS_Store": b"x"}
    with pytest.raises(DatasetError, match="empty"):
        prepare(make_zip(tmp_path / "d.zip", files), tmp_path)


def test_several_jsonl_files_at_the_same_depth_are_ambiguous(tmp_path):
    files = {"one.jsonl": record("a.png", "x").encode(), "two.jsonl": record("a.png", "y").encode(), "images/a.png": png_bytes()}
    with pytest.raises(DatasetError, match="several JSONL"):
        prepare(make_zip(tmp_path / "d.zip", files), tmp_path)


# ---------------------------------------------------------------- bad containers


def test_missing_dataset(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        prepare(tmp_path / "nope.zip", tmp_path)


def test_empty_file(tmp_path):
    (tmp_path / "empty.zip").write_bytes(b"")
    with pytest.raises(DatasetError, match="empty"):
        prepare(tmp_path / "empty.zip", tmp_path)


def test_empty_zip_and_empty_directory(tmp_path):
    make_zip(tmp_path / "e.zip", {})
    with pytest.raises(DatasetError, match="empty"):
        prepare(tmp_path / "e.zip", tmp_path)
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(DatasetError, match="empty"):
        prepare(tmp_path / "emptydir", tmp_path)


def test_not_an_archive(tmp_path):
    (tmp_path / "data.zip").write_text("hello, I am text")
    with pytest.raises(DatasetError, match="not a zip, a tar.gz or a directory"):
        prepare(tmp_path / "data.zip", tmp_path)


def test_corrupt_zip(tmp_path):
    data = make_zip(tmp_path / "ok.zip", {"images/a.png": png_bytes(size=256), "images/a.txt": b"c"}).read_bytes()
    (tmp_path / "bad.zip").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="corrupt zip"):
        prepare(tmp_path / "bad.zip", tmp_path)


def test_corrupt_tar_gz(tmp_path):
    source = make_sample_dataset.write_dataset(tmp_path / "ok.tar.gz", "tar.gz", count=4, size=64)
    data = source.read_bytes()
    (tmp_path / "bad.tar.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match="corrupt tar"):
        prepare(tmp_path / "bad.tar.gz", tmp_path)


# ---------------------------------------------------------------- safety


@pytest.mark.parametrize("name", ["../evil.txt", "images/../../evil.txt", "/tmp/evil.txt", "C:/evil.txt"])
def test_zip_slip_and_absolute_entries_are_refused(tmp_path, name):
    archive = tmp_path / "in" / "d.zip"
    archive.parent.mkdir()
    make_zip(archive, {"images/a.png": png_bytes(), "images/a.txt": b"c", name: b"pwned"})
    with pytest.raises(DatasetError, match="zip-slip|absolute"):
        prepare(archive, tmp_path / "work")
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "work" / "evil.txt").exists()


def test_tar_slip_is_refused(tmp_path):
    archive = tmp_path / "d.tar.gz"
    with tarfile.open(archive, "w:gz") as handle:
        info = tarfile.TarInfo("../../evil.txt")
        info.size = 5
        handle.addfile(info, io.BytesIO(b"pwned"))
    with pytest.raises(DatasetError, match="zip-slip"):
        prepare(archive, tmp_path / "work")


def test_zip_symlink_pointing_out_is_refused(tmp_path):
    archive = tmp_path / "d.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("images/a.png", png_bytes())
        link = zipfile.ZipInfo("images/b.png")
        link.external_attr = (0o120777 << 16)
        handle.writestr(link, "../../../etc/passwd")
    with pytest.raises(DatasetError, match="symlink"):
        prepare(archive, tmp_path)


def test_tar_symlink_pointing_out_is_refused(tmp_path):
    archive = tmp_path / "d.tar.gz"
    with tarfile.open(archive, "w:gz") as handle:
        link = tarfile.TarInfo("images/b.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        handle.addfile(link)
    with pytest.raises(DatasetError, match="links to"):
        prepare(archive, tmp_path)


def test_directory_symlink_pointing_out_is_not_followed(tmp_path):
    outside = tmp_path / "secret.png"
    outside.write_bytes(png_bytes())
    source = tmp_path / "data"
    (source / "images").mkdir(parents=True)
    (source / "images" / "a.png").write_bytes(png_bytes())
    (source / "images" / "a.txt").write_text("cap")
    (source / "images" / "b.png").symlink_to(outside)
    (source / "images" / "b.txt").write_text("cap b")
    report, captions, _ = prepare(source, tmp_path / "work")
    assert list(captions) == ["a"] and report.skipped["symlink_outside"] == 1


def test_zip_bomb_ratio_is_refused(tmp_path):
    archive = make_zip(tmp_path / "bomb.zip", {"images/a.png": png_bytes(), "images/a.txt": b"c", "pad.bin": b"\0" * 4_000_000})
    with pytest.raises(DatasetError, match="zip bomb"):
        prepare(archive, tmp_path, ratio_applies_above=1_000_000, max_ratio=50)


def test_total_size_limit_is_enforced(tmp_path):
    archive = make_zip(tmp_path / "big.zip", {"images/a.png": png_bytes(), "images/a.txt": b"c", "pad.bin": b"\1" * 200_000})
    with pytest.raises(DatasetError, match="exceeds the limit"):
        prepare(archive, tmp_path, max_total_bytes=100_000)


def test_nothing_is_written_outside_the_work_dir(tmp_path, sample_zip):
    before = {p for p in tmp_path.rglob("*")}
    prepare_dataset(sample_zip, tmp_path / "work" / "dataset", tmp_path / "work" / "scratch")
    new = {p for p in tmp_path.rglob("*")} - before
    assert all(p.is_relative_to(tmp_path / "work") for p in new)
