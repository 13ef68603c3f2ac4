"""`--file SRC:REL`: parsed, recorded, and placed into the run's method copy without following links."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from envmgr.core.errors import UsageError
from envmgr.runs.method_files import given_files, mounts_over_image, parse_files, place_files, recorded_files

USER = f"{os.getuid()}:{os.getgid()}"


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    path = tmp_path / "cfg.json"
    path.write_text('{"steps": 2}\n')
    return path


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    method = tmp_path / "work" / "method"
    (method / "config").mkdir(parents=True)
    (method / "train.sh").write_text("echo\n")
    return method


def test_a_file_lands_at_its_relative_path_with_its_folders_made(cfg, copy):
    files = parse_files([f"{cfg}:config/my/config.json"])
    assert files[0].source == cfg and files[0].path == "config/my/config.json"
    place_files(files, copy, USER)
    placed = copy / "config" / "my" / "config.json"
    assert placed.read_text() == '{"steps": 2}\n'
    assert placed.stat().st_mode & 0o600 == 0o600


def test_a_file_already_there_is_replaced(cfg, copy):
    (copy / "config" / "config.json").write_text("old")
    place_files(parse_files([f"{cfg}:./config/config.json"]), copy, USER)
    assert (copy / "config" / "config.json").read_text() == '{"steps": 2}\n'


@pytest.mark.parametrize("rel", ["/etc/passwd", "../outside.json", "config/../../x", "", ".", "a/\0b"])
def test_paths_outside_the_method_folder_are_refused(cfg, rel):
    with pytest.raises(UsageError, match="--file"):
        parse_files([f"{cfg}:{rel}"])


def test_missing_source_and_overlapping_paths_are_refused(cfg, tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        parse_files([f"{tmp_path / 'nope'}:config.json"])
    with pytest.raises(UsageError, match="expected SRC:REL"):
        parse_files([str(cfg)])
    with pytest.raises(UsageError, match="overlap"):
        parse_files([f"{cfg}:config/a.json", f"{cfg}:config/a.json"])
    with pytest.raises(UsageError, match="overlap"):
        parse_files([f"{tmp_path}:config", f"{cfg}:config/a.json"])


def test_a_link_on_the_way_is_refused_and_nothing_is_written_through_it(cfg, copy, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (copy / "config" / "my").symlink_to(outside)          # left by the method in an earlier attempt
    with pytest.raises(UsageError, match="link or not a folder"):
        place_files(parse_files([f"{cfg}:config/my/config.json"]), copy, USER)
    assert list(outside.iterdir()) == []


def test_a_link_at_the_place_itself_is_replaced_not_written_through(cfg, copy, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    (copy / "config" / "config.json").symlink_to(victim)
    place_files(parse_files([f"{cfg}:config/config.json"]), copy, USER)
    assert victim.read_text() == "keep"
    placed = copy / "config" / "config.json"
    assert not placed.is_symlink() and placed.read_text() == '{"steps": 2}\n'


def test_the_copy_itself_as_a_link_is_refused(cfg, copy, tmp_path):
    link = tmp_path / "linked-copy"
    link.symlink_to(copy)
    with pytest.raises(UsageError, match="cannot open the method's copy"):
        place_files(parse_files([f"{cfg}:c.json"]), link, USER)


def test_a_folder_is_merged_into_the_copy(copy, tmp_path):
    source = tmp_path / "configs"
    (source / "my").mkdir(parents=True)
    (source / "my" / "config.json").write_text("{}")
    (source / "multidatabackend.json").write_text("[]")
    (copy / "config" / "kept.json").write_text("k")
    place_files(parse_files([f"{source}:config"]), copy, USER)
    assert (copy / "config" / "my" / "config.json").read_text() == "{}"
    assert (copy / "config" / "multidatabackend.json").read_text() == "[]"
    assert (copy / "config" / "kept.json").read_text() == "k"


def test_a_file_cannot_replace_a_folder(cfg, copy):
    with pytest.raises(UsageError, match="is a folder there"):
        place_files(parse_files([f"{cfg}:config"]), copy, USER)


def test_resume_takes_the_recorded_files_unless_given_again(cfg, tmp_path):
    record = {"files": [{"source": str(cfg), "path": "config/my/config.json", "hash": "sha256:x"}]}
    [again] = given_files([], record, tmp_path)
    assert again.source == cfg and again.path == "config/my/config.json"
    other = tmp_path / "other.json"
    other.write_text("{}")
    [given] = given_files([f"{other}:config/my/config.json"], record, tmp_path)
    assert given.source == other
    cfg.unlink()
    with pytest.raises(UsageError, match="is gone"):
        given_files([], record, tmp_path)


@pytest.mark.parametrize("entry", [{"source": "relative.json", "path": "a"}, {"source": "/x", "path": "../a"},
                                   {"path": "a"}, "nonsense"])
def test_a_tampered_record_is_refused(tmp_path, entry):
    with pytest.raises(UsageError):
        recorded_files({"files": [entry]}, tmp_path)


def test_without_a_copy_files_are_mounted_over_the_image_method_folder(cfg):
    assert mounts_over_image(parse_files([f"{cfg}:config/my/config.json"])) == [
        (cfg, "/opt/envmgr/method/config/my/config.json")]


def test_slurm_refuses_file_before_anything_is_submitted(cfg, tmp_path):
    from envmgr.core.spec import MethodSpec
    from envmgr.runs.plan import RunRequest
    from envmgr.runs.slurm import SlurmRequest, _check_request

    spec = MethodSpec(name="m", entry=["bash", "train.sh"], workdir="method")
    request = RunRequest(method=spec, files=[f"{cfg}:config/my/config.json"])
    with pytest.raises(UsageError, match="--file is for local runs"):
        _check_request(request, spec, SlurmRequest())
