import json
import os
import subprocess
import sys

import pytest

from envmgr.core.errors import UsageError
from envmgr.door.engine import gpu_device_requests


def _envmgr(*args, **env):
    full = {**os.environ, "ENVMGR_CONFIG": "/dev/null", **env}
    return subprocess.run([sys.executable, "-m", "envmgr", *args], capture_output=True, text=True, env=full)


def test_help_documents_exit_codes():
    out = _envmgr("--help").stdout
    assert "Exit codes" in out and "130" in out


def test_unknown_method_is_exit_2_with_one_line():
    proc = _envmgr("show", "no-such-method")
    assert proc.returncode == 2
    assert "unknown method 'no-such-method'" in proc.stderr and "Traceback" not in proc.stderr


def test_list_json_includes_sd_demo():
    proc = _envmgr("--json", "list")
    event = json.loads(proc.stdout.strip().splitlines()[-1])
    assert any(m["name"] == "sd-demo" for m in event["methods"])


def test_lock_check_passes_for_committed_sd_demo_lock():
    proc = _envmgr("lock", "sd-demo", "--check")
    assert proc.returncode == 0, proc.stderr


def test_gpu_flag_becomes_device_requests():
    assert gpu_device_requests("none") == []
    assert gpu_device_requests("all")[0]["Count"] == -1
    assert gpu_device_requests("2")[0]["Count"] == 2
    assert gpu_device_requests("0,1")[0]["DeviceIDs"] == ["0", "1"]
    with pytest.raises(UsageError):
        gpu_device_requests("0,,1")


def test_messages_with_brackets_are_printed_verbatim():
    from rich.console import Console

    from envmgr.core.ui import Reporter

    ui = Reporter("rich")
    ui.err = Console(record=True, width=200)
    ui.error("fix it with [adapt] pin = { x = \"1\" } in [mirrors]", hint="see [env]")
    text = ui.err.export_text()
    assert "[adapt] pin" in text and "[mirrors]" in text and "[env]" in text


# ---------------------------------------------------------------- error rendering (typer's CliRunner)

def _invoke(monkeypatch, tmp_path, *args):
    from typer.testing import CliRunner

    from envmgr.face.cli import STATE, app

    monkeypatch.setenv("ENVMGR_CONFIG", "/dev/null")
    monkeypatch.setattr(sys, "argv", ["envmgr", *args])
    STATE.clear()
    return CliRunner().invoke(app, list(args))


def test_an_unexpected_exception_is_one_line_with_the_traceback_in_a_log_file(monkeypatch, tmp_path):
    import envmgr.core.spec

    def broken(base_dir):
        return [][1]

    monkeypatch.setattr(envmgr.core.spec, "list_methods", broken)
    result = _invoke(monkeypatch, tmp_path, "--base-dir", str(tmp_path / "base"),
                     "--cache-dir", str(tmp_path / "cache"), "list")
    said = result.stdout + result.stderr
    assert result.exit_code == 1
    assert "internal error: IndexError: list index out of range" in said
    assert "Traceback" not in said and "File \"" not in said
    [log] = (tmp_path / "cache" / "logs").glob("internal-*.log")
    assert str(log) in said.replace("\n", "")
    assert "envmgr -v --base-dir" in said and "list`" in said
    text = log.read_text()
    assert "Traceback (most recent call last):" in text and "IndexError: list index out of range" in text
    assert text.startswith("$ envmgr -v --base-dir") and oct(log.stat().st_mode & 0o777) == "0o600"


def test_runs_show_says_the_verdict_and_the_rule(monkeypatch, tmp_path):
    from envmgr.runs import records

    run_dir = tmp_path / "base" / "runs" / "m" / "20261206-100000-abcd"
    run_dir.mkdir(parents=True)
    records.write_record(run_dir, {
        "run_id": run_dir.name, "method": "m", "status": "failed", "exit_code": 0, "reason": "uncaught traceback",
        "verdict": {"status": "failed", "rule": "traceback", "hint": "set dataset_mode = \"writable\"",
                    "detail": "exit 0 but the log ends in an uncaught traceback: OSError: [Errno 30] Read-only"}})
    result = _invoke(monkeypatch, tmp_path, "--base-dir", str(tmp_path / "base"), "runs", "show", run_dir.name)
    assert result.exit_code == 0, result.stdout + result.stderr
    assert ("verdict: failed — exit 0 but the log ends in an uncaught traceback: OSError: [Errno 30] Read-only "
            "(rule: traceback)") in result.stdout
    assert 'dataset_mode = "writable"' in result.stdout


def test_unreachable_sources_put_one_fix_on_each_line():
    from envmgr.lock.adapt import UnreachableSources, raise_if_unreachable

    problems = ["envmgr-beta comes from git x → [adapt] pin = { envmgr-beta = \"1.0\" }",
                "index 'pytorch' (https://download.example.invalid) has no site mirror → [adapt] sources = {}"]
    with pytest.raises(UnreachableSources) as raised:
        raise_if_unreachable("third", problems)
    lines = raised.value.message.splitlines()
    assert lines[0].startswith("third: 2 dependencies cannot be fetched")
    assert [line.strip() for line in lines[1:]] == [f"- {p}" for p in problems]
