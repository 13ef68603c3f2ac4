"""The engine stopping during a run, against fakes of the engine's API: the run is recorded failed with the
reason, its log and tail are kept, and the container it left is removed once the engine answers again.
(The real engine stop is tests/integration/test_engine_restart.py, run alone: `make test-integration`.)"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import requests
import urllib3.exceptions

from envmgr.core.config import load_config
from envmgr.core.errors import EngineError
from envmgr.core.ui import Reporter
from envmgr.door.containers import ContainerResult, ContainerSpec
from envmgr.door.context import Context
from envmgr.door.engine import Engine, EngineGone
from envmgr.runs import records
from envmgr.runs.ledger import list_runs
from envmgr.runs.run import _follow

NAME = "envmgr-run-m-20261129-230000-abcd"


class _DroppingApi:
    """Streams two lines, then the connection drops (mid-stream, or as a clean EOF); every later call fails."""

    def __init__(self, mid_stream: bool):
        self.mid_stream = mid_stream
        self.removed: list[str] = []

    def create_host_config(self, **kwargs):
        return kwargs

    def create_container(self, **kwargs):
        return {"Id": "c0ffee"}

    def start(self, container_id):
        pass

    def logs(self, *args, **kwargs):
        yield b"tick 1\n"
        yield b"tick 2\n"
        if self.mid_stream:
            raise urllib3.exceptions.ProtocolError("Connection broken: IncompleteRead")

    def wait(self, container_id):
        raise requests.exceptions.ConnectionError("connection refused")

    def remove_container(self, container_id, force=False):
        raise requests.exceptions.ConnectionError("connection refused")


@pytest.mark.parametrize("mid_stream", [True, False])
def test_engine_run_says_the_engine_is_gone_and_names_the_container(mid_stream):
    engine = Engine.__new__(Engine)
    engine._api = _DroppingApi(mid_stream)
    lines: list[str] = []
    with pytest.raises(EngineGone) as gone:
        engine.run(ContainerSpec(image="i", command=["x"], name=NAME), on_line=lines.append)
    assert gone.value.container == NAME and gone.value.exit_code == 4
    assert "stopped answering while the container ran" in gone.value.message
    assert lines == ["tick 1", "tick 2"]


def test_a_callback_error_is_not_taken_for_a_dropped_engine():
    engine = Engine.__new__(Engine)
    engine._api = _DroppingApi(mid_stream=False)

    def full(line: str) -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        engine.run(ContainerSpec(image="i", command=["x"], name=NAME), on_line=full)


class _FakeEngine:
    def __init__(self):
        self.state: dict | None = {"running": False, "exit_code": 143, "oom_killed": False}
        self.removed: list[str] = []
        self.stopped: list[str] = []
        self.away = False

    def run(self, spec, on_line=None, on_start=None, on_partial=None) -> ContainerResult:
        on_line("step 1")
        raise EngineGone("the Docker Engine stopped answering while the container ran", spec.name)

    def container_state(self, name):
        if self.away:
            raise EngineError("Docker Engine not reachable")
        return self.state

    def stop_container(self, name, timeout=30):
        self.stopped.append(name)
        self.state = {"running": False, "exit_code": 137, "oom_killed": False}

    def remove_container(self, name, force=False):
        self.removed.append(name)
        self.state = None


def _ctx(tmp_path: Path, engine: _FakeEngine) -> Context:
    config = load_config({"base_dir": str(tmp_path / "base"), "cache_dir": str(tmp_path / "cache")}, files=[])
    return Context(config=config, ui=Reporter("json"), _engine=engine)  # type: ignore[arg-type]


def test_follow_records_the_lost_engine_in_the_log_and_the_tail(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ended = _follow(_ctx(tmp_path, _FakeEngine()), ContainerSpec(image="i", command=["x"], name=NAME), run_dir)
    assert ended.status == "failed" and ended.code is None and isinstance(ended.engine_gone, EngineGone)
    assert ended.tail[-1] == "envmgr: the Docker Engine stopped answering while the container ran"
    log = (run_dir / records.LOG).read_text()
    assert "step 1\n# envmgr: the Docker Engine stopped answering" in log


def _left_run(tmp_path: Path) -> Path:
    run_dir = tmp_path / "base" / "runs" / "m" / "20261129-230000-abcd"
    run_dir.mkdir(parents=True)
    records.write_record(run_dir, {"run_id": run_dir.name, "method": "m", "status": "failed",
                                   "reason": "engine unreachable: the Docker Engine stopped answering",
                                   "container": NAME, "container_left": True, "exit_code": None})
    return run_dir


def test_runs_removes_the_left_container_once_the_engine_is_back_and_keeps_the_verdict(tmp_path):
    engine = _FakeEngine()
    engine.away = True
    run_dir = _left_run(tmp_path)
    ctx = _ctx(tmp_path, engine)
    assert list_runs(ctx)[0]["container_left"] is True           # still away: nothing changes, a warning only
    assert not engine.removed

    engine.away = False
    settled = list_runs(ctx)[0]
    assert engine.removed == [NAME] and not engine.stopped
    assert settled["status"] == "failed" and settled["reason"].startswith("engine unreachable")
    assert settled["container_left"] is False and settled["container_exit_code"] == 143
    on_disk = json.loads((run_dir / records.RECORD).read_text())
    assert on_disk == settled
    assert "was removed once the engine was back" in (run_dir / records.LOG).read_text()
    assert list_runs(ctx)[0] == settled and engine.removed == [NAME]   # settled once


def test_a_container_the_engine_kept_running_is_stopped_before_it_is_removed(tmp_path):
    engine = _FakeEngine()
    engine.state = {"running": True, "exit_code": None, "oom_killed": False}   # a live-restore engine
    _left_run(tmp_path)
    settled = list_runs(_ctx(tmp_path, engine))[0]
    assert engine.stopped == [NAME] and engine.removed == [NAME] and settled["container_exit_code"] == 137


def test_settling_a_killed_run_frees_the_space_its_envmgr_held_for_the_record(tmp_path):
    engine = _FakeEngine()
    engine.state = {"running": False, "exit_code": 1, "oom_killed": False}
    run_dir = tmp_path / "base" / "runs" / "m" / "20261129-230000-abcd"
    run_dir.mkdir(parents=True)
    (run_dir / ".envmgr-reserve-0").write_bytes(b"\0" * 4096)
    records.write_record(run_dir, {"run_id": run_dir.name, "method": "m", "status": "running", "container": NAME,
                                   "envmgr": {"pid": 999999999, "pid_start": "1", "host": os.uname().nodename}})
    settled = list_runs(_ctx(tmp_path, engine))[0]
    assert settled["status"] == "failed" and engine.removed == [NAME]
    assert not (run_dir / ".envmgr-reserve-0").exists()
