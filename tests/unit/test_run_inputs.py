"""Run-time inputs, env, the per-run method copy, the honest verdict and progress for any method: engine-free."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console

from envmgr.build.target import method_excludes
from envmgr.core.errors import UsageError
from envmgr.core.spec import MethodSpec
from envmgr.core.ui import Reporter, TrainingProgress, latest_segment
from envmgr.door.engine import Engine
from envmgr.door.logs import LineSplitter
from envmgr.lock.methods import add_method
from envmgr.runs.inputs import copy_method, parse_env, parse_input, parse_inputs, recorded_env, recorded_inputs
from envmgr.runs.plan import RunRequest, given as _given
from envmgr.runs.run import _failure
from envmgr.runs.verdict import missing_outputs

OLD_NS = 1_000_000_000_000_000_000   # 2001: a file from an earlier attempt


def _spec(tmp_path: Path, **extra) -> MethodSpec:
    spec = MethodSpec(name="m", entry=["bash", "train.sh"], **extra)
    spec.folder = tmp_path
    return spec


# ---------------------------------------------------------------- verdict

def test_exit_0_without_the_success_files_is_not_a_success(tmp_path):
    spec = _spec(tmp_path, success=["output/*.safetensors", "output/config.json"])
    (tmp_path / "output").mkdir()
    started = time.time_ns()
    assert missing_outputs(spec, tmp_path, started) == ["output/*.safetensors", "output/config.json"]
    (tmp_path / "output" / "lora.safetensors").write_bytes(b"w")
    assert missing_outputs(spec, tmp_path, started) == ["output/config.json"]
    (tmp_path / "output" / "config.json").write_text("{}")
    assert missing_outputs(spec, tmp_path, started) == []


def test_files_left_by_an_earlier_attempt_do_not_count(tmp_path):
    spec = _spec(tmp_path, success=["output/*"])
    old = tmp_path / "output" / "checkpoint-5" / "w.bin"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"w")
    os.utime(old, ns=(OLD_NS, OLD_NS))
    started = time.time_ns()
    assert missing_outputs(spec, tmp_path, started) == ["output/*"]
    (old.parent / "new.bin").write_bytes(b"n")          # a folder matched counts by a file written under it
    assert missing_outputs(spec, tmp_path, started) == []


def test_a_link_in_the_output_does_not_count_as_written(tmp_path):
    spec = _spec(tmp_path, success=["output/*"])
    (tmp_path / "output").mkdir()
    (tmp_path / "elsewhere").write_text("x")
    (tmp_path / "output" / "link").symlink_to(tmp_path / "elsewhere")
    assert missing_outputs(spec, tmp_path, time.time_ns() - 10**9) == ["output/*"]


def test_no_success_key_means_the_exit_code_alone(tmp_path):
    assert missing_outputs(_spec(tmp_path), tmp_path, time.time_ns()) == []


@pytest.mark.parametrize("pattern", ["/etc/*", "../other/*", "output/../../x", ""])
def test_success_globs_stay_inside_the_run_dir(tmp_path, pattern):
    with pytest.raises(ValueError, match="relative to the run directory"):
        _spec(tmp_path, success=[pattern])


def test_method_add_writes_no_success_rule_a_cache_file_could_meet(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "requirements.txt").write_text("envmgr-alpha\n")
    (repo / "train.py").write_text("print(1)\n")
    spec, _ = add_method(tmp_path / "base", repo, "pipper")
    assert spec.success is None and spec.verdict == "training" and spec.workdir == "method" and not spec.builtin
    written = (tmp_path / "base" / "methods" / "pipper" / "envmgr.toml").read_text()
    assert 'success = ["output/lora.safetensors"]' in written                  # documented in a comment
    assert not any(line.startswith("success") for line in written.splitlines())


def test_failure_message_says_no_outputs_and_what_is_missing(tmp_path):
    record = {"reason": "no outputs", "missing_outputs": ["output/*.safetensors"], "exit_code": 0}
    error = _failure("20261129-100000-abcd", tmp_path, record, ["done"])
    assert "failed (no outputs)" in error.message and "output/*.safetensors" in error.message
    crashed = _failure("20261129-100000-abcd", tmp_path, {"exit_code": 3}, [])
    assert "failed (exit 3)" in crashed.message


# ---------------------------------------------------------------- --input

def test_input_mounts_under_its_basename_or_the_name_given(tmp_path):
    config = tmp_path / "config.json"
    config.write_text("{}")
    assert parse_input(str(config)).name == "config.json"
    named = parse_input(f"{config}:cfg")
    assert named.name == "cfg" and named.path == config and named.target == "/envmgr/inputs/cfg"


def test_a_path_holding_a_colon_is_taken_whole(tmp_path):
    odd = tmp_path / "a:b"
    odd.mkdir()
    with pytest.raises(UsageError, match="not a usable name"):   # taken whole, its name is no mount name
        parse_input(str(odd))
    given = parse_input(f"{odd}:data")
    assert given.path == odd and given.name == "data"


@pytest.mark.parametrize("text, message", [
    ("/nonexistent/config.json", "does not exist"),
    ("{tmp}/config.json:..", "does not exist"),
    ("{tmp}/config.json:bad/name", "does not exist"),
    ("{tmp}/with space", "not a usable name"),
])
def test_bad_inputs_are_usage_errors(tmp_path, text, message):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "with space").write_text("{}")
    with pytest.raises(UsageError, match=message):
        parse_input(text.format(tmp=tmp_path))


def test_an_input_name_given_twice_is_refused(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "config.json").write_text("{}")
    with pytest.raises(UsageError, match="given twice"):
        parse_inputs([str(tmp_path / "a" / "config.json"), str(tmp_path / "b" / "config.json")])
    both = parse_inputs([str(tmp_path / "a" / "config.json"), f"{tmp_path / 'b' / 'config.json'}:other"])
    assert [i.name for i in both] == ["config.json", "other"]


def test_recorded_inputs_must_still_exist_and_be_well_formed(tmp_path):
    kept = tmp_path / "cfg"
    kept.write_text("x")
    record = {"inputs": [{"name": "cfg", "path": str(kept), "hash": "sha256:x"}]}
    assert recorded_inputs(record, tmp_path)[0].path == kept
    kept.unlink()
    with pytest.raises(UsageError, match="is gone"):
        recorded_inputs(record, tmp_path)
    for bad in ([{"name": "../x", "path": "/etc"}], [{"name": "x", "path": "etc"}], "x"):
        with pytest.raises(UsageError):
            recorded_inputs({"inputs": bad}, tmp_path)


# ---------------------------------------------------------------- --env

def test_env_is_parsed_and_names_envmgr_sets_are_refused():
    assert parse_env(["ENV=prod", "CONFIG_BACKEND=json", "EMPTY=", "EQ=a=b"]) == {
        "ENV": "prod", "CONFIG_BACKEND": "json", "EMPTY": "", "EQ": "a=b"}
    for name in ("ENVMGR_RUN_ID", "HOME", "PATH", "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"):
        with pytest.raises(UsageError, match="envmgr sets it itself"):
            parse_env([f"{name}=x"])
    for bad in ("1X=y", "A-B=y", "NOEQUALS", "A=1\0"):
        with pytest.raises(UsageError):
            parse_env([bad])
    with pytest.raises(UsageError, match="given twice"):
        parse_env(["A=1", "A=2"])


def test_recorded_env_is_validated_like_a_given_one(tmp_path):
    assert recorded_env({"env": {"ENV": "prod"}}, tmp_path) == {"ENV": "prod"}
    for bad in ({"HOME": "/root"}, {"A": 1}, ["A=1"]):
        with pytest.raises(UsageError):
            recorded_env({"env": bad}, tmp_path)


def test_resume_reuses_the_record_unless_given_again(tmp_path):
    cfg = tmp_path / "cfg"
    cfg.write_text("x")
    previous = {"inputs": [{"name": "cfg", "path": str(cfg)}], "env": {"ENV": "prod"}}
    request = RunRequest(method=_spec(tmp_path), resume="20261129-100000-abcd")
    inputs, env = _given(request, previous, tmp_path)
    assert [i.name for i in inputs] == ["cfg"] and env == {"ENV": "prod"}
    request.env = ["ENV=test"]
    assert _given(request, previous, tmp_path)[1] == {"ENV": "test"}
    fresh = RunRequest(method=_spec(tmp_path))
    assert _given(fresh, None, tmp_path) == ([], {})


# ---------------------------------------------------------------- workdir = "method"

def test_method_copy_is_the_image_files_writable_and_kept_on_resume(tmp_path):
    source = tmp_path / "source"
    (source / "config").mkdir(parents=True)
    (source / "train.sh").write_text("echo hi\n")
    (source / "config" / "config.json").write_text("{}")
    (source / "config" / "config.json").chmod(0o444)
    (source / "notes.tmp").write_text("x")
    spec = _spec(tmp_path, source_dir="source", exclude=["*.tmp"], workdir="method")
    work = tmp_path / "run" / "work"
    work.mkdir(parents=True)
    user = f"{os.getuid()}:{os.getgid()}"
    copy = copy_method(spec, work, user, method_excludes(spec))
    assert sorted(p.relative_to(copy).as_posix() for p in copy.rglob("*")) == [
        "config", "config/config.json", "train.sh"]
    assert (copy / "config" / "config.json").stat().st_mode & 0o200, "the run's user can write its copy"
    (copy / "debug.log").write_text("state")
    (source / "train.sh").write_text("changed\n")
    assert copy_method(spec, work, user, method_excludes(spec)) == copy
    assert (copy / "debug.log").read_text() == "state" and (copy / "train.sh").read_text() == "echo hi\n"


def test_method_copy_through_a_link_is_refused(tmp_path):
    (tmp_path / "source").mkdir()
    spec = _spec(tmp_path, source_dir="source", workdir="method")
    work = tmp_path / "work"
    work.mkdir()
    (work / "method").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UsageError, match="symbolic link"):
        copy_method(spec, work, f"{os.getuid()}:{os.getgid()}", method_excludes(spec))


# ---------------------------------------------------------------- progress for any method

def test_latest_segment_of_a_tqdm_line():
    assert latest_segment("\r  0%|          | 0/10\r 50%|#####     | 5/10\r") == "50%|#####     | 5/10"
    assert latest_segment("plain line") == "plain line"
    assert latest_segment("\x1b[2Kx" + "y" * 300, width=20).endswith("…")


def test_splitter_pending_is_the_bar_as_it_is_now():
    splitter = LineSplitter()
    assert list(splitter.feed(b"epoch 1\n\r 10%|#| 1/10")) == ["epoch 1"]
    assert splitter.pending() == " 10%|#| 1/10"
    assert list(splitter.feed(b"\r 20%|##| 2/10")) == [] and splitter.pending() == " 20%|##| 2/10"


def test_engine_follow_reports_partial_tqdm_lines():
    engine = Engine.__new__(Engine)
    chunks = [b"loading\n", b"\r 10%|#| 1/10", b"\r 20%|##| 2/10", b"\r100%|###| 10/10\n", b"done"]
    engine._api = SimpleNamespace(logs=lambda *a, **k: iter(chunks))
    lines: list[str] = []
    partial: list[str] = []
    engine._follow("c", lines.append, partial.append)
    assert partial == [" 10%|#| 1/10", " 20%|##| 2/10"]
    assert lines[0] == "loading" and lines[-1] == "done" and lines[1].endswith("100%|###| 10/10")


def _rich_reporter() -> Reporter:
    ui = Reporter("rich")
    ui.console = Console(file=io.StringIO(), force_terminal=True, width=120)
    return ui


def test_rich_display_shows_the_last_line_until_json_progress_arrives():
    display = TrainingProgress(_rich_reporter())
    display.line("\r 10%|#| 1/10\r 20%|##| 2/10")
    assert display._status is not None
    assert display._status.tasks[0].description == "20%|##| 2/10"
    display.line("step 3 loss 0.5")
    assert display._status.tasks[0].description == "step 3 loss 0.5"
    display.update({"event": "progress", "step": 1, "max_steps": 10, "loss": 0.5, "s_per_step": 1.0})
    assert display._status is None and display._bar is not None
    display.line("ignored now")
    assert display._status is None
    display.close()


def test_plain_mode_is_unchanged_by_method_lines(capsys):
    display = TrainingProgress(Reporter("plain"))
    display.line("\r 10%|#| 1/10")
    display.close()
    assert capsys.readouterr().out == ""


def test_a_run_settled_after_envmgr_died_gets_the_same_verdict(tmp_path):
    import socket

    from envmgr.runs import records
    from envmgr.runs.ledger import settle

    base = tmp_path / "base"
    method = base / "methods" / "m"
    method.mkdir(parents=True)
    (method / "envmgr.toml").write_text('name = "m"\nentry = ["bash", "train.sh"]\nsuccess = ["output/*"]\n')
    run_dir = base / "runs" / "m" / "20261129-100000-abcd"
    (run_dir / "output").mkdir(parents=True)
    warned: list[str] = []
    ctx = SimpleNamespace(
        config=SimpleNamespace(base_dir=base), ui=SimpleNamespace(warn=warned.append),
        engine=SimpleNamespace(container_state=lambda name: {"running": False, "exit_code": 0, "oom_killed": False},
                               remove_container=lambda name, force=False: None))
    record = {"run_id": run_dir.name, "method": "m", "status": "running", "container": "envmgr-run-m-x",
              "envmgr": {"pid": 2**22 + 7, "pid_start": "1", "host": socket.gethostname()},
              "attempts": [{"started": "2026-11-29T10:00:00+00:00", "ended": None, "status": "running"}]}
    settled = settle(ctx, run_dir, dict(record))      # `output/*` by an old `method add`: the default rules
    assert (settled["status"], settled["reason"]) == ("failed", "no training outputs")
    assert settled["verdict"]["rule"] == "training files"
    (run_dir / "output" / "lora.safetensors").write_text("w")
    settled = settle(ctx, run_dir, dict(record, attempts=[dict(record["attempts"][0])]))
    assert settled["status"] == "succeeded"
    assert records.read_record(run_dir)["status"] == "succeeded"
