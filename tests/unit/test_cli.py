import json
import os
import subprocess
import sys

import pytest

from envmgr.engine import gpu_device_requests
from envmgr.errors import UsageError


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

    from envmgr.ui import Reporter

    ui = Reporter("rich")
    ui.err = Console(record=True, width=200)
    ui.error("fix it with [adapt] pin = { x = \"1\" } in [mirrors]", hint="see [env]")
    text = ui.err.export_text()
    assert "[adapt] pin" in text and "[mirrors]" in text and "[env]" in text
