"""The Docker Engine stopping during `envmgr run`: the run is recorded failed with the reason, envmgr exits 4
with one line, and once the engine is back `envmgr runs` is consistent and the container is not left behind.

Two ways. The engine's socket going away (a relay in front of it is stopped: tests/support/engine_proxy.py)
runs with the rest of the suite; the container keeps running in the real engine, as under live-restore.
The real thing stops the machine's one dockerd (SIGTERM, as `systemctl stop` would) and starts it again the way
tests/support/engine.py does, so it runs alone, after the rest of the integration suite:
`ENVMGR_TEST_ENGINE_RESTART=1 pytest tests/integration -m engine_restart` (the Makefile's integration target runs
it when that variable is 1, as .ci/run sets it, and otherwise says it skipped it). Without both it is skipped, so a
`make test` on a shared server never stops the engine; with other containers running it refuses to stop it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import docker
import pytest

from tests.integration.conftest import REPO as SOURCE_ROOT, TINY_PYPROJECT, TINY_SPEC
from tests.support.engine import ensure_engine
from tests.support.engine_proxy import EngineProxy
from tests.support.said import error_lines

pytestmark = pytest.mark.engine

NAME = "tiny-enginestop"   # its own image name: nothing else on the engine uses it
TICKER = """\
import os, sys, time
for tick in range(int(os.environ.get("TICKS", "600"))):
    print(f"tick {tick}", flush=True)
    time.sleep(0.2)
"""


def _dockerd_pid() -> int | None:
    found = subprocess.run(["pgrep", "-x", "dockerd"], capture_output=True, text=True).stdout.split()
    return int(found[0]) if len(found) == 1 else None


def _wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _log_has(base_dir: Path, text: str) -> Path | None:
    for log in (base_dir / "runs" / NAME).glob("*/log.txt"):
        if text in log.read_text(errors="replace"):
            return log.parent
    return None


@pytest.fixture
def ticker(workspace, mirror_a):
    folder = workspace.base_dir / "methods" / NAME
    folder.mkdir(parents=True)
    (folder / "envmgr.toml").write_text(TINY_SPEC.replace('name = "tiny"', f'name = "{NAME}"')
                                        .replace('"main.py"', '"ticker.py"'))
    (folder / "pyproject.toml").write_text(TINY_PYPROJECT)
    (folder / "ticker.py").write_text(TICKER)
    workspace.envmgr("lock", NAME, mirror=mirror_a.url)
    workspace.envmgr("build", NAME, mirror=mirror_a.url)
    return workspace


def _runs(ws, **env) -> list[dict]:
    proc = ws.envmgr("--json", "runs", **env)
    return json.loads([line for line in proc.stdout.splitlines() if '"event": "runs"' in line][-1])["runs"]


def test_engine_socket_going_away_during_a_run_is_recorded_and_runs_removes_the_container_later(ticker, engine,
                                                                                               tmp_path):
    proxy = EngineProxy(tmp_path / "engine.sock").start()
    through = {"DOCKER_HOST": proxy.url}
    proc = subprocess.Popen([sys.executable, "-m", "envmgr", "run", NAME, "--gpus", "none"],
                            env=ticker.env(**through), cwd=SOURCE_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        run_dir = _wait_for(lambda: _log_has(ticker.base_dir, "tick 3"), 120, "the run's fourth line")
        proxy.stop()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        proxy.stop()
    try:
        errors = error_lines(err)
        assert proc.returncode == 4, (proc.returncode, out, err)
        assert "Traceback" not in err and len(errors) <= 2, err
        assert "stopped answering while the container ran" in errors[0], err
        record = json.loads((run_dir / "run.json").read_text())
        assert record["status"] == "failed" and record["reason"].startswith("engine unreachable: ")
        assert record["container_left"] is True and record["ended"]
        left = engine.containers.get(record["container"])
        assert left.status == "running"               # the engine itself never stopped

        # still unreachable: `envmgr runs` lists the run as recorded, warns, changes nothing
        still = [r for r in _runs(ticker, **through) if r["run_id"] == record["run_id"]]
        assert still == [record]

        proxy.start()                                  # the engine answers again
        settled = [r for r in _runs(ticker, **through) if r["run_id"] == record["run_id"]]
        assert len(settled) == 1 and settled[0]["status"] == "failed" and settled[0]["reason"] == record["reason"]
        assert settled[0]["container_left"] is False and settled[0]["container_exit_code"] is not None
        assert not engine.containers.list(all=True, filters={"name": record["container"]}), "orphaned container"
        assert [r for r in _runs(ticker, **through) if r["run_id"] == record["run_id"]] == settled
        print(f"\nengine-gone fault (socket): 1 tried, 1 survived; container stopped and removed by `envmgr runs` "
              f"(exit {settled[0]['container_exit_code']}); envmgr said: {errors[0]!r}")
    finally:
        proxy.stop()
        for container in engine.containers.list(all=True, filters={"label": f"org.envmgr.method={NAME}"}):
            container.remove(force=True)


@pytest.mark.engine_restart
def test_engine_stopping_during_a_run_is_recorded_and_nothing_is_left_once_it_is_back(ticker, engine):
    others = [c.name for c in engine.containers.list() if not c.name.startswith(f"envmgr-run-{NAME}-")]
    if others:
        pytest.skip(f"other containers run on this engine ({', '.join(others[:3])}): stopping dockerd would kill them")
    pid = _dockerd_pid()
    if pid is None:
        pytest.skip("no single dockerd process on this machine to stop (an engine elsewhere?)")

    proc = subprocess.Popen([sys.executable, "-m", "envmgr", "run", NAME, "--gpus", "none"], env=ticker.env(),
                            cwd=SOURCE_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stopped_at = None
    try:
        run_dir = _wait_for(lambda: _log_has(ticker.base_dir, "tick 3"), 120, "the run's fourth line")
        os.kill(pid, signal.SIGTERM)
        stopped_at = time.monotonic()
        _wait_for(lambda: not Path(f"/proc/{pid}").exists(), 120, "dockerd to exit")
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        ensure_engine()          # always: the engine is shared, it must be up whatever happened
    down_s = time.monotonic() - stopped_at if stopped_at else None

    errors = error_lines(err)
    assert proc.returncode == 4, (proc.returncode, out, err)
    assert "Traceback" not in err and len(errors) <= 2, err
    assert "stopped answering while the container ran" in errors[0] and str(run_dir / "run.json") in errors[0], err
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "failed" and record["reason"].startswith("engine unreachable: ")
    assert record["container_left"] is True and record["attempts"][-1]["status"] == "failed"
    assert "tick 3" in (run_dir / "log.txt").read_text()

    client = docker.from_env(timeout=120)   # a fresh connection to the restarted engine
    try:
        listed = json.loads([line for line in ticker.envmgr("--json", "runs").stdout.splitlines()
                             if '"event": "runs"' in line][-1])["runs"]
        ours = [r for r in listed if r["run_id"] == record["run_id"]]
        assert len(ours) == 1 and ours[0]["status"] == "failed" and ours[0]["reason"] == record["reason"]
        assert ours[0]["container_left"] is False
        assert not client.containers.list(all=True, filters={"label": f"org.envmgr.method={NAME}"}), "orphaned"
        again = json.loads((run_dir / "run.json").read_text())
        assert again == {**record, "container_left": False, "container_exit_code": again["container_exit_code"]}
        # the engine is usable again, and the method runs to the end
        ran = ticker.envmgr("run", NAME, "--gpus", "none", "--env", "TICKS=3", check=False)
        assert ran.returncode == 0, ran.stderr
        print(f"\nengine-stop fault: 1 tried, 1 survived (run recorded failed: {record['reason']!r}; container "
              f"removed on `envmgr runs`, exit {again['container_exit_code']}); engine down and back in {down_s:.1f} s;"
              f" a run afterwards exited {ran.returncode}")
    finally:
        for container in client.containers.list(all=True, filters={"label": f"org.envmgr.method={NAME}"}):
            container.remove(force=True)
        client.close()
