"""A hostile method in its box, against the real engine: it plants links, edits what it can reach,
prints a 50 MB line, outlives a SIGKILLed envmgr; nothing outside its run's output changes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.conftest import REPO

pytestmark = pytest.mark.engine

HOSTILE_MAIN = r'''
import os, sys, time
mode = next((a for a in sys.argv[1:] if not a.startswith("--")), "links")
victim = os.environ.get("VICTIM", "/nonexistent")
run = "/envmgr/run"
if mode == "links":
    # everything this container can write: links over every record name, aimed at a host file
    for folder in (run, run + "/output"):
        for name in ("run.json", "run.json.tmp", ".run.json.1.tmp", "log.txt", "output"):
            try:
                os.symlink(victim, os.path.join(folder, name))
            except OSError as exc:
                print("could not plant", folder, name, exc)
    for path in ("/etc/passwd", "/opt/envmgr/method/main.py", "/envmgr/escape"):
        try:
            open(path, "a").write("owned\n")
            print("WROTE", path)
        except OSError as exc:
            print("refused", path, exc.errno)
    print("uid", os.getuid(), "gid", os.getgid())
    open(run + "/output/result.txt", "w").write("ok\n")
elif mode == "bigline":
    sys.stdout.write("B" * (50 << 20) + "\n")
    print("after the big line")
elif mode == "sleep" and "--resume" not in sys.argv:
    open(run + "/output/started", "w").write("1\n")
    print("sleeping", flush=True)
    time.sleep(120)
print("done", mode, flush=True)
'''

HOSTILE_SPEC = """\
name = "tiny"
description = "hostile fixture method"
backend = "poetry"
entry = ["python", "main.py"]
gpu = "optional"
platform_args = false
workdir = "run"
"""


@pytest.fixture
def hostile(workspace, mirror_a, tmp_path):
    (workspace.method_dir / "main.py").write_text(HOSTILE_MAIN)
    (workspace.method_dir / "envmgr.toml").write_text(HOSTILE_SPEC)
    workspace.envmgr("lock", "tiny", mirror=mirror_a.url)
    workspace.envmgr("build", "tiny", mirror=mirror_a.url)
    victim = tmp_path / "victim.txt"
    victim.write_text("host file, untouched\n")
    workspace.victim = victim
    return workspace


def _events(proc) -> list[dict]:
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def _run_dir(ws, proc) -> Path:
    done = [e for e in _events(proc) if e.get("event") in ("done", "step") and e.get("run_dir")]
    return Path(done[-1]["run_dir"])


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in root.rglob("*")}


def test_links_planted_by_the_method_never_turn_envmgrs_writes_elsewhere(hostile, engine):
    before = _snapshot(hostile.base_dir / "methods")
    ran = hostile.envmgr("--json", "run", "tiny", "--gpus", "none", "--", "links", VICTIM=str(hostile.victim))
    run_dir = _run_dir(hostile, ran)
    # resume twice and list: envmgr writes run.json and log.txt again each time
    hostile.envmgr("--json", "run", "tiny", "--resume", run_dir.name, VICTIM=str(hostile.victim))
    hostile.envmgr("runs")
    hostile.envmgr("gc", "--method", "tiny")
    assert hostile.victim.read_text() == "host file, untouched\n"
    assert not (run_dir / "run.json").is_symlink() and not (run_dir / "log.txt").is_symlink()
    assert json.loads((run_dir / "run.json").read_text())["status"] == "succeeded"
    log = (run_dir / "log.txt").read_text()
    assert "WROTE" not in log, log
    assert "uid 65534 gid 65534" in log     # root invoked envmgr: the method ran as nobody
    assert (run_dir / "output" / "result.txt").stat().st_uid == 65534
    assert _snapshot(hostile.base_dir / "methods") == before


def test_a_planted_link_over_the_log_stops_the_run_before_it_starts(hostile, engine):
    ran = hostile.envmgr("--json", "run", "tiny", "--gpus", "none", "--", "sleep-not", VICTIM=str(hostile.victim))
    run_dir = _run_dir(hostile, ran)
    (run_dir / "log.txt").unlink()
    (run_dir / "log.txt").symlink_to(hostile.victim)
    again = hostile.envmgr("run", "tiny", "--resume", run_dir.name, check=False)
    assert again.returncode == 2 and "will not append" in again.stderr
    assert hostile.victim.read_text() == "host file, untouched\n"


def test_resume_never_mounts_what_an_edited_record_names(hostile, engine):
    ran = hostile.envmgr("--json", "run", "tiny", "--gpus", "none", "--", "done")
    run_dir = _run_dir(hostile, ran)
    record = json.loads((run_dir / "run.json").read_text())
    record["model"] = {"name": "etc", "path": "/etc", "hash": "sha256:0"}
    (run_dir / "run.json").write_text(json.dumps(record))
    again = hostile.envmgr("run", "tiny", "--resume", run_dir.name, check=False)
    assert again.returncode == 2 and "will not mount it" in again.stderr, again.stderr
    for bad in ("../tiny", "../../etc", "20261129-000000-zzzz"):
        refused = hostile.envmgr("run", "tiny", "--resume", bad, check=False)
        assert refused.returncode == 2, refused.stderr


def test_a_50_mb_output_line_is_capped_and_the_run_ends(hostile, engine):
    started = time.monotonic()
    ran = hostile.envmgr("--json", "run", "tiny", "--gpus", "none", "--", "bigline")
    run_dir = _run_dir(hostile, ran)
    log = (run_dir / "log.txt").read_text()
    assert "bytes of this line dropped" in log and "after the big line" in log
    assert (run_dir / "log.txt").stat().st_size < 1 << 20
    assert json.loads((run_dir / "run.json").read_text())["status"] == "succeeded"
    print(f"50 MB line: run took {time.monotonic() - started:.1f} s")


def _container_of(engine, run_id: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = engine.containers.list(filters={"label": f"org.envmgr.run-id={run_id}"})
        if found:
            return found[0]
        time.sleep(0.3)
    raise AssertionError(f"no container for run {run_id}")


def _start_sleeping_run(ws) -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen([sys.executable, "-m", "envmgr", "--json", "run", "tiny", "--gpus", "none", "--",
                             "sleep"], env=ws.env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 120
    runs_root = ws.base_dir / "runs" / "tiny"
    while time.monotonic() < deadline:
        started = list(runs_root.glob("*/output/started")) if runs_root.is_dir() else []
        if started:
            return proc, started[0].parent.parent
        time.sleep(0.3)
    proc.kill()
    raise AssertionError("the run did not start: " + proc.stderr.read())


def test_run_container_is_least_privilege(hostile, engine):
    proc, run_dir = _start_sleeping_run(hostile)
    try:
        attrs = _container_of(engine, run_dir.name).attrs
        host = attrs["HostConfig"]
        assert host["CapDrop"] == ["ALL"] and not host.get("CapAdd")
        assert "no-new-privileges" in host["SecurityOpt"]
        assert host["ReadonlyRootfs"] is True and "/tmp" in host["Tmpfs"]
        assert host["PidsLimit"] and host["PidsLimit"] > 0
        # bounded by default: a memory limit, and /tmp and /dev/shm no larger than it
        assert host["Memory"] > 0 and 0 < host["ShmSize"] <= host["Memory"] and "size=" in host["Tmpfs"]["/tmp"]
        record = json.loads((run_dir / "run.json").read_text())
        assert set(record["limits"]) == {"memory", "shm", "tmp"}
        assert attrs["Config"]["User"] == "65534:65534"
        mounts = {m["Destination"]: m for m in attrs["Mounts"]}
        assert set(mounts) == {"/envmgr/run", "/envmgr/run/output"}
        assert mounts["/envmgr/run/output"]["Source"] == str(run_dir / "output")
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=180)
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "interrupted" and record["run_as"] == "65534:65534"
    assert not engine.containers.list(all=True, filters={"label": f"org.envmgr.run-id={run_dir.name}"})


def test_sigkilled_envmgr_is_settled_by_the_next_command_and_resume_waits_for_it(hostile, engine):
    proc, run_dir = _start_sleeping_run(hostile)
    container = _container_of(engine, run_dir.name)
    # while envmgr lives, the run cannot be resumed
    refused = hostile.envmgr("run", "tiny", "--resume", run_dir.name, check=False)
    assert refused.returncode == 2 and "still running" in refused.stderr
    proc.kill()
    proc.wait()
    assert engine.containers.get(container.id).status == "running"    # orphaned, for now
    listed = hostile.envmgr("--json", "runs")
    runs = [e for e in _events(listed) if e.get("event") == "runs"][-1]["runs"]
    record = next(r for r in runs if r["run_id"] == run_dir.name)
    assert record["status"] == "interrupted" and "envmgr was killed" in record["reason"]
    assert not engine.containers.list(all=True, filters={"label": f"org.envmgr.run-id={run_dir.name}"})
    # the recorded --gpus none is kept: the resumed run does not ask for GPUs this engine lacks
    (hostile.method_dir / "envmgr.toml").write_text(HOSTILE_SPEC.replace('gpu = "optional"', 'gpu = "required"'))
    hostile.envmgr("build", "tiny")
    resumed = hostile.envmgr("--json", "run", "tiny", "--resume", run_dir.name, check=False)
    assert "NVIDIA" not in resumed.stderr
    assert json.loads((run_dir / "run.json").read_text())["gpus"] == "none"


def test_method_add_of_a_repository_with_a_device_file_is_refused_by_name(workspace, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "requirements.txt").write_text("envmgr-alpha==1.0\n")
    (repo / "train.py").write_text("print('hi')\n")
    os.mknod(repo / "zero", 0o666 | 0o020000, os.makedev(1, 5))
    proc = workspace.envmgr("method", "add", str(repo), "--name", "devrepo", check=False)
    assert proc.returncode == 2 and "character device" in proc.stderr, proc.stderr
    assert not (workspace.base_dir / "methods" / "devrepo").exists()
    for bad in ("x..", "base-bookworm-py311"):
        refused = workspace.envmgr("method", "add", str(repo), "--name", bad, check=False)
        assert refused.returncode == 2, refused.stderr


def test_two_quick_ctrl_c_still_end_in_a_consistent_record(hostile, engine):
    proc, run_dir = _start_sleeping_run(hostile)
    _container_of(engine, run_dir.name)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)      # the second one only says the container is still stopping
    proc.wait(timeout=180)
    out = proc.stdout.read() + proc.stderr.read()
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "interrupted" and record["attempts"][-1]["status"] == "interrupted", out
    assert proc.returncode == 130, f"exit {proc.returncode}: {out}"
    assert not engine.containers.list(all=True, filters={"label": f"org.envmgr.run-id={run_dir.name}"})
