"""The run target seam (envmgr/runs/targets.py): a target registered in `TARGETS` is reached by `envmgr run
--on NAME`, `runs`, `runs show`, `runs cancel` and `doctor`, with no other change; and run.json read and
written through its model (envmgr/runs/records.py)."""

from __future__ import annotations

import json
import os
import socket
import sys
from types import SimpleNamespace

import pytest

from envmgr.core.errors import EngineError, UsageError
from envmgr.runs import records, targets
from envmgr.runs.plan import new_run_id, now, prepare_base_dir
from envmgr.runs.records import Status


class FakeTarget:
    """A queue that takes every run and never runs it (until `follow`): only the table knows it."""

    name = "fake"
    hands_over = True

    def __init__(self) -> None:
        self.submitted: list[dict] = []

    def submit(self, ctx, request, options) -> dict:
        prepare_base_dir(ctx.config.base_dir)
        run_id = new_run_id()
        run_dir = ctx.config.base_dir / "runs" / request.method.name / run_id
        run_dir.mkdir(parents=True)
        record = {"layout": records.LAYOUT, "run_id": run_id, "method": request.method.name,
                  "status": Status.RUNNING, "arguments": request.args, "started": now(), "ended": None,
                  "envmgr": {"pid": 2**22 + 17, "pid_start": "1", "host": socket.gethostname()},  # no such process
                  "scheduler": {"kind": self.name, "job_id": f"q-{len(self.submitted) + 1}"}}
        records.write_record(run_dir, record)
        self.submitted.append({"options": dict(options), "run_id": run_id})
        return record

    def _end(self, ctx, record: dict, status: Status) -> dict:
        run_dir = ctx.config.base_dir / "runs" / record["method"] / record["run_id"]
        stored = records.read_record(run_dir)
        stored.update(status=status, ended=now())
        records.write_record(run_dir, stored)
        return stored

    def follow(self, ctx, record, timeout=None) -> dict:
        return self._end(ctx, record, Status.SUCCEEDED)

    def refresh(self, runs) -> None:
        for record in runs:
            record["scheduler"]["state"] = "QUEUED"

    def cancel(self, ctx, record) -> dict:
        return self._end(ctx, record, Status.INTERRUPTED)

    def alive(self, record) -> bool:
        return True        # the queue owns its runs: no dead envmgr's run to settle

    def doctor_checks(self, base_dir) -> list[tuple[str, str, bool]]:
        return [("fake queue", f"answers for {base_dir}", True)]

    def where(self, record) -> str:
        return f"fake queue {record['scheduler']['job_id']}"

    def handed_over(self, record):
        return f"fake queue {record['scheduler']['job_id']}", {"job_id": record["scheduler"]["job_id"]}


@pytest.fixture
def fake(monkeypatch):
    target = FakeTarget()
    monkeypatch.setitem(targets.TARGETS, target.name, target)
    return target


def _invoke(monkeypatch, tmp_path, *args):
    from typer.testing import CliRunner

    from envmgr.face.cli import STATE, app

    monkeypatch.setenv("ENVMGR_CONFIG", "/dev/null")
    argv = ["--base-dir", str(tmp_path / "base"), "--cache-dir", str(tmp_path / "cache"), *args]
    monkeypatch.setattr(sys, "argv", ["envmgr", *argv])
    STATE.clear()
    return CliRunner().invoke(app, argv)


def test_a_target_in_the_table_runs_through_the_same_verbs(monkeypatch, tmp_path, fake):
    said = _invoke(monkeypatch, tmp_path, "run", "sd-demo", "--on", "fake", "--nodes", "2", "--", "--max_steps=1")
    assert said.exit_code == 0, said.stdout + said.stderr
    [submitted] = fake.submitted
    run_id = submitted["run_id"]
    assert submitted["options"]["nodes"] == 2
    assert f"run {run_id} submitted: fake queue q-1" in said.stdout + said.stderr
    run_dir = tmp_path / "base" / "runs" / "sd-demo" / run_id
    on_disk = json.loads((run_dir / "run.json").read_text())
    assert on_disk["scheduler"]["kind"] == "fake" and on_disk["arguments"] == ["--max_steps=1"]

    listed = _invoke(monkeypatch, tmp_path, "--json", "runs")
    assert listed.exit_code == 0, listed.stdout + listed.stderr
    [run] = [json.loads(line) for line in listed.stdout.splitlines() if '"runs"' in line][0]["runs"]
    # its envmgr pid is gone, but the fake target says the run is owned: not settled as a dead local run's
    assert run["status"] == "running" and run["scheduler"]["state"] == "QUEUED"
    table = _invoke(monkeypatch, tmp_path, "runs")
    assert "fake queue q-1" in table.stdout

    shown = _invoke(monkeypatch, tmp_path, "runs", "show", run_id)
    assert shown.exit_code == 0 and '"QUEUED"' in shown.stdout

    cancelled = _invoke(monkeypatch, tmp_path, "runs", "cancel", run_id)
    assert cancelled.exit_code == 0, cancelled.stdout + cancelled.stderr
    assert records.read_record(run_dir)["status"] == "interrupted"

    waited = _invoke(monkeypatch, tmp_path, "run", "sd-demo", "--on", "fake", "--wait")
    assert waited.exit_code == 0, waited.stdout + waited.stderr
    assert "succeeded" in waited.stdout + waited.stderr and len(fake.submitted) == 2


def test_an_unknown_target_is_a_usage_error_that_names_the_table(monkeypatch, tmp_path, fake):
    said = _invoke(monkeypatch, tmp_path, "run", "sd-demo", "--on", "moon")
    assert said.exit_code == 2
    assert "--on 'moon': expected local, slurm or fake" in said.stdout + said.stderr
    with pytest.raises(UsageError, match="expected local, slurm or fake"):
        targets.pick("moon")


def test_without_a_fake_the_table_is_local_and_slurm():
    with pytest.raises(UsageError, match=r"--on 'moon': expected local or slurm$"):
        targets.pick("moon")


def test_a_local_run_cannot_be_cancelled_and_a_record_of_an_unknown_target_is_local(tmp_path, fake):
    assert targets.of({"run_id": "x"}) is targets.TARGETS["local"]
    assert targets.of({"scheduler": {"kind": "fake"}}) is fake
    assert targets.of({"scheduler": {"kind": "k8s"}}) is targets.TARGETS["local"]
    with pytest.raises(UsageError, match="is a local run: stop it with Ctrl-C"):
        targets.TARGETS["local"].cancel(SimpleNamespace(), {"run_id": "20261206-100000-abcd"})


def test_doctor_asks_every_target(tmp_path, fake):
    from envmgr.face import doctor

    def down():
        raise EngineError("no engine here")

    ctx = SimpleNamespace(engine=SimpleNamespace(version=down), config=SimpleNamespace(base_dir=tmp_path),
                          ui=SimpleNamespace(warn=lambda *a, **k: None))
    found = {check.check: check for check in doctor.checks(ctx)}
    assert found["fake queue"].status == f"answers for {tmp_path}" and "slurm" in found


# ---------------------------------------------------------------- run.json through its model


def test_an_old_record_reads_and_is_written_back_with_its_own_keys(tmp_path):
    old = {"run_id": "20261129-101010-abcd", "method": "sd-demo", "status": "succeeded", "exit_code": 0,
           "image": {"id": "sha256:1", "tag": "envmgr/sd-demo:1"}, "something_newer": [1, 2]}   # no layout
    (tmp_path / "run.json").write_text(json.dumps(old))
    record = records.read_record(tmp_path)
    assert record == old and records.RunRecord.model_validate(record).layout == 1
    records.write_record(tmp_path, record)
    assert json.loads((tmp_path / "run.json").read_text()) == old        # no default added


def test_status_is_an_enum_of_the_strings_run_json_holds(tmp_path):
    assert [s.value for s in Status] == ["pending", "running", "succeeded", "failed", "interrupted"]
    record = {"run_id": "20261129-101010-abcd", "method": "m", "status": Status.FAILED, "attempts": [
        {"status": Status.FAILED}], "layout": records.LAYOUT}
    records.write_record(tmp_path, record)
    text = (tmp_path / "run.json").read_text()
    assert json.loads(text) == {**record, "status": "failed", "attempts": [{"status": "failed"}]}
    assert json.dumps(Status.RUNNING) == '"running"' and f"{Status.RUNNING}" == "running"
    assert records.read_record(tmp_path)["status"] == Status.FAILED


def test_a_record_with_a_wrong_type_is_refused_by_the_one_reader(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"run_id": "r", "method": "m", "status": "failed",
                                                   "exit_code": "not a number"}))
    with pytest.raises(UsageError, match="not a valid run record .*exit_code"):
        records.read_record(tmp_path)
    with pytest.raises(UsageError, match="not a valid run record"):
        records.write_record(tmp_path, {"run_id": "r", "method": "m", "status": "failed", "layout": "two"})
    assert os.path.exists(tmp_path / "run.json")
