"""The box around untrusted method code, engine-free: records that never follow links, bounded log lines,
validated names, paths, sizes and special files, masked credentials."""

from __future__ import annotations

import json
import os
import time

import pytest

from envmgr.core.archive import extract
from envmgr.core.config import load_config
from envmgr.core.credentials import credentials_in, mask_credentials, mask_url
from envmgr.core.errors import UsageError
from envmgr.core.spec import MethodSpec, name_problem
from envmgr.door.logs import LineSplitter, split_lines
from envmgr.runs import records
from envmgr.runs.run import parse_size


def test_record_write_replaces_a_planted_link_never_its_target(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("host file")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").symlink_to(victim)
    (run_dir / f".run.json.{os.getpid()}.tmp").symlink_to(victim)
    records.write_record(run_dir, {"run_id": "x", "method": "m", "status": "running"})
    assert victim.read_text() == "host file"
    assert not (run_dir / "run.json").is_symlink()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "running"


def test_log_is_never_opened_through_a_link(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("host file\n")
    (tmp_path / "log.txt").symlink_to(victim)
    with pytest.raises(UsageError, match="will not append"):
        records.open_log(tmp_path)
    assert victim.read_text() == "host file\n"


def test_reading_a_linked_or_malformed_record_is_refused(tmp_path):
    (tmp_path / "elsewhere.json").write_text(json.dumps({"run_id": "a", "method": "m", "status": "failed"}))
    (tmp_path / "run.json").symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(UsageError):
        records.read_record(tmp_path)
    (tmp_path / "run.json").unlink()
    (tmp_path / "run.json").write_text("[1, 2]")
    with pytest.raises(UsageError, match="not a valid run record"):
        records.read_record(tmp_path)


def test_malformed_record_is_named_and_the_others_still_listed(tmp_path):
    good = tmp_path / "m" / "20261129-100000-abcd"
    bad = tmp_path / "m" / "20261129-100001-abce"
    for folder in (good, bad):
        folder.mkdir(parents=True)
    records.write_record(good, {"run_id": good.name, "method": "m", "status": "succeeded"})
    (bad / "run.json").write_text("{not json")
    found = list(records.iter_records(tmp_path))
    assert [type(r).__name__ for _, r in found] == ["dict", "Malformed"]


@pytest.mark.parametrize("run_id", ["../x", "20261129-100000-abcd/..", "", "x" * 30, "20261129-100000-ABCD"])
def test_run_ids_outside_envmgrs_pattern_are_refused(run_id):
    with pytest.raises(UsageError):
        records.check_run_id(run_id)


def test_line_splitter_caps_a_huge_line_keeping_head_and_tail():
    splitter = LineSplitter(max_line=100)
    lines = list(splitter.feed(b"H" * 80 + b"x" * 10_000)) + list(splitter.feed(b"T" * 25 + b"\nnext\n"))
    assert len(lines) == 2 and lines[1] == "next"
    assert lines[0].startswith("H" * 75) and lines[0].endswith("T" * 25)
    assert "bytes of this line dropped" in lines[0] and len(lines[0]) < 200


def test_line_splitting_is_linear_in_its_input():
    chunk = b"y" * (1 << 16)

    def feed(megabytes: int) -> float:
        started = time.perf_counter()
        list(split_lines(chunk for _ in range(megabytes * 16)))
        return time.perf_counter() - started

    small, large = feed(4), feed(64)   # 16x the input must not cost anywhere near 256x the time
    assert large < max(small, 1e-3) * 60


def test_lines_split_across_chunks_and_a_last_line_without_newline():
    assert list(split_lines([b"ab", b"c\nd", b"e\r\nf"])) == ["abc", "de", "f"]


@pytest.mark.parametrize("name", ["x..", "x.", ".x", "a--", "A", "base-bookworm-py311", "a" * 64, "a/b", "a b"])
def test_method_names_that_are_not_image_names_or_clash_are_refused(name):
    assert name_problem(name)


@pytest.mark.parametrize("name", ["sd-demo", "a.b", "a__b", "x1", "my_method-2"])
def test_good_method_names_pass(name):
    assert name_problem(name) is None


@pytest.mark.parametrize("key", ["source_dir", "lock_dir"])
def test_spec_paths_stay_inside_the_method_folder(key):
    with pytest.raises(ValueError):
        MethodSpec(name="m", entry=["python", "x.py"], **{key: "../other"})
    with pytest.raises(ValueError):
        MethodSpec(name="m", entry=["python", "x.py"], **{key: "/etc"})


def test_spec_path_through_a_link_out_of_the_folder_is_refused(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "src").symlink_to("/etc")
    spec = MethodSpec(name="m", entry=["python", "x.py"], source_dir="src")
    spec.folder = tmp_path / "m"
    with pytest.raises(UsageError, match="outside the method's folder"):
        _ = spec.source_path


def test_method_add_refuses_a_fifo_by_name(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "train.py").write_text("print(1)\n")
    os.mkfifo(repo / "pipe")
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(UsageError, match="named pipe"):
        extract(repo, dest)


def test_method_add_refuses_a_device_file_by_name(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    try:
        os.mknod(repo / "zero", 0o666 | 0o020000, os.makedev(1, 5))
    except PermissionError:
        pytest.fail("tests run as root here; mknod must work")
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(UsageError, match="character device"):
        extract(repo, dest)


@pytest.mark.parametrize("size", ["abc", "0", "-1", "8 g", "1.5g"])
def test_bad_sizes_are_usage_errors(size):
    with pytest.raises(UsageError):
        parse_size(size, "--shm-size")


def test_good_sizes_pass():
    assert parse_size("8G", "--shm-size") == "8g" and parse_size("512m", "--memory") == "512m"


def test_token_given_as_url_user_alone_is_masked():
    token = "ghp_0123456789abcdef"
    assert token in credentials_in(f"https://{token}@mirror.example/simple")
    assert token not in (mask_url(f"https://{token}@mirror.example/simple") or "")


def test_credential_in_a_mistyped_config_value_is_masked(tmp_path, monkeypatch):
    monkeypatch.delenv("ENVMGR_CONFIG", raising=False)
    config = tmp_path / "config.toml"
    config.write_text('[mirrors]\nca_bundle = "https://builder:Tok3n-Secret@mirror.example/ca.pem"\n')
    loaded = load_config(files=[config], inherit_host=False)
    assert "Tok3n-Secret" in loaded.secrets()
    config.write_text('[mirrors]\npypi = 5\n[run]\nrun_as = "https://u:Tok3n-Secret@h/x"\n')
    with pytest.raises(UsageError) as failed:
        load_config(files=[config], inherit_host=False)
    assert "Tok3n-Secret" not in str(failed.value)
    assert mask_credentials("x https://u:pw-123@h/y") == "x https://***@h/y"


def test_non_utf8_config_is_a_usage_error(tmp_path):
    config = tmp_path / "config.toml"
    config.write_bytes(b'[mirrors]\npypi = "\xff\xfe"\n')
    with pytest.raises(UsageError, match="not UTF-8"):
        load_config(files=[config], inherit_host=False)


def test_a_model_the_run_user_cannot_read_is_refused_before_start(tmp_path):
    from envmgr.runs.run import _check_inputs_readable

    model = tmp_path / "model"
    (model / "vae").mkdir(parents=True)
    weights = model / "vae" / "weights.safetensors"
    weights.write_bytes(b"x")
    weights.chmod(0o600)          # what an atomic save as root leaves
    with pytest.raises(UsageError, match="not readable by the user the method runs as"):
        _check_inputs_readable([("model", model)], "65534:65534")
    _check_inputs_readable([("model", model)], "0:0")
    weights.chmod(0o644)
    _check_inputs_readable([("model", model)], "65534:65534")


def test_import_staging_never_creates_a_folder_through_a_member_link(tmp_path):
    from envmgr.core.errors import EnvmgrError
    from envmgr.ship.transfer import METHOD_PREFIX, _stage_targets

    outside = tmp_path / "outside"
    outside.mkdir()
    manifest = {"members": [{"name": METHOD_PREFIX + "evil", "link": str(outside)},
                            {"name": METHOD_PREFIX + "evil/sub/file.py", "size": 1, "sha256": "0"}]}
    with pytest.raises(EnvmgrError, match="lies under a link"):
        _stage_targets(manifest, tmp_path / "staging" / "method")
    assert list(outside.iterdir()) == []


def test_step_credentials_go_to_a_mounted_netrc_never_the_environment(tmp_path):
    from envmgr.core.config import load_config
    from envmgr.core.ui import Reporter
    from envmgr.door.context import Context
    from envmgr.door.steps import credentials_file

    ctx = Context(load_config({"cache_dir": str(tmp_path)}, files=[], inherit_host=False), Reporter("plain"))
    env = {"UV_DEFAULT_INDEX": "http://builder:s3cret-Tok@127.0.0.1:8080/simple/",
           "UV_INDEX": "http://127.0.0.1:9/a/ https://tok-only-0123456789@mirror.example/b/", "HOME": "/tmp"}
    with credentials_file(ctx, env) as (clean, mounts):
        assert "s3cret-Tok" not in str(clean) and "tok-only-0123456789" not in str(clean)
        assert clean["UV_DEFAULT_INDEX"] == "http://127.0.0.1:8080/simple/" and clean["NETRC"]
        netrc = mounts[0].source.read_text()
        assert "machine 127.0.0.1 login builder password s3cret-Tok" in netrc
        assert "machine mirror.example login tok-only-0123456789 password " in netrc
        assert mounts[0].read_only and oct(mounts[0].source.stat().st_mode)[-3:] == "600"
    assert not mounts[0].source.exists()
    with credentials_file(ctx, {"UV_DEFAULT_INDEX": "http://127.0.0.1/simple/"}) as (clean, mounts):
        assert mounts == [] and "NETRC" not in clean


def test_contained_paths_never_pass_through_a_link_or_leave_the_folder(tmp_path):
    from envmgr.core.archive import contained

    folder = tmp_path / "staging"
    folder.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (folder / "evil").symlink_to(outside)
    assert contained(folder, "evil/sub/file.py") is None and list(outside.iterdir()) == []
    assert contained(folder, "../x") is None and contained(folder, "/etc/passwd") is None
    assert contained(folder, "a/b/c.py") == folder / "a" / "b" / "c.py" and (folder / "a" / "b").is_dir()
