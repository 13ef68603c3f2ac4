"""A record left `running` whose envmgr is gone (SIGKILL, a crash), or a run that ended when the engine stopped
answering: its container stopped, read and removed, and the record says how the run ended. Who still owns a
record is the run target's to say (`alive`); `owner_alive` is the answer for a run this host's envmgr follows."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import socket
from collections.abc import Callable
from pathlib import Path

from envmgr.core.errors import UsageError
from envmgr.core.spec import find_method
from envmgr.door.context import Context
from envmgr.runs import outputs as run_outputs, records
from envmgr.runs.plan import end_attempt, now
from envmgr.runs.records import Status
from envmgr.runs.verdict import Verdict, judge


def process_start(pid: int) -> str | None:
    """A process's start time (clock ticks since boot): with the pid it names one process, not a reused pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def owner_record() -> dict:
    """run.json's `envmgr`: the process that follows the run (host, pid and its start)."""
    return {"pid": os.getpid(), "pid_start": process_start(os.getpid()), "host": socket.gethostname()}


def owner_alive(record: dict) -> bool:
    """The envmgr that follows the run is alive (or on another host: not this one's to settle)."""
    owner = record.get("envmgr")
    if not isinstance(owner, dict):
        return False            # a record without its envmgr (an older one): settle it
    if owner.get("host") != socket.gethostname():
        return True             # another machine's run in a shared base dir: not ours to settle
    pid = owner.get("pid")
    return isinstance(pid, int) and pid > 0 and process_start(pid) is not None and (
        process_start(pid) == owner.get("pid_start"))


def _left_container(ctx: Context, record: dict) -> tuple[str, dict | None]:
    recorded = record.get("container")
    name = recorded if isinstance(recorded, str) and recorded.startswith("envmgr-run-") else ""
    return name, ctx.engine.container_state(name) if name else None


def _end_container(ctx: Context, run_dir: Path, record: dict) -> tuple[Status, str, dict | None]:
    """The container of a run whose envmgr died: stopped if it still runs, read, removed; how the run ended."""
    name, state = _left_container(ctx, record)
    if state and state["running"]:
        ctx.engine.stop_container(name, timeout=120)
        state = ctx.engine.container_state(name) or state
        status, reason = Status.INTERRUPTED, "envmgr was killed; its container was stopped by the next envmgr command"
    elif state:
        code = state["exit_code"]
        status = (Status.SUCCEEDED if code == 0 else Status.INTERRUPTED if code in (130, 143)
                  else Status.FAILED)
        reason = "envmgr was killed while the container ran; the container's exit status was read afterwards"
    else:
        status, reason = Status.FAILED, "envmgr was killed (no container of the run was left)"
    if state:
        with records.open_log(run_dir) as log:
            log.write(f"# envmgr: {reason}\n")
        ctx.engine.remove_container(name, force=True)
    return status, reason, state


def settle(ctx: Context, run_dir: Path, record: dict, alive: Callable[[dict], bool] = owner_alive) -> dict:
    """A record still `running` whose owner is gone (`alive` says no): stop its container, record why.
    A run that ended when the engine stopped answering: remove the container it left, once the engine is back."""
    if record.get("container_left") is True and record.get("status") != Status.RUNNING:
        return _remove_left_container(ctx, run_dir, record)
    if record.get("status") != Status.RUNNING or alive(record):
        return record
    status, reason, state = _end_container(ctx, run_dir, record)
    for reserve in run_dir.glob(".envmgr-reserve-*"):   # the space its envmgr held for the final record
        reserve.unlink(missing_ok=True)
    code = state["exit_code"] if state else None
    outputs = run_outputs.inspect_noted(ctx, run_dir, run_outputs.Handover.from_record(record["outputs_for"])
                                        if "outputs_for" in record else None)   # before the verdict reads them
    verdict = _verdict_after_kill(ctx, run_dir, record) if status == Status.SUCCEEDED else None
    if verdict:
        record.update(verdict.fields())
        status, reason = verdict.status, verdict.reason or reason
    record.update(status=status, reason=reason, exit_code=code, ended=now(), artifacts=outputs.artifacts(),
                  refused_outputs=outputs.refused, changed_outputs=outputs.changed)
    end_attempt(record, status)
    records.write_record(run_dir, record)
    ctx.ui.warn(f"run {record.get('run_id')}: {reason} → {status}")
    return record


def _remove_left_container(ctx: Context, run_dir: Path, record: dict) -> dict:
    """The container a run left when the engine stopped answering: stopped if the engine kept it running, read
    and removed. The run stays failed (envmgr could not follow it); its exit status is recorded beside."""
    name, state = _left_container(ctx, record)   # EngineError while the engine is still away
    if state and state["running"]:
        ctx.engine.stop_container(name, timeout=120)
        state = ctx.engine.container_state(name) or state
    if state:
        ctx.engine.remove_container(name, force=True)
    note = (f"its container {name} (exit {state['exit_code']}) was removed once the engine was back" if state
            else "no container of the run was left in the engine")
    with contextlib.suppress(OSError, UsageError), records.open_log(run_dir) as log:
        log.write(f"# envmgr: {note}\n")
    record.update(container_left=False, container_exit_code=state["exit_code"] if state else None)
    records.write_record(run_dir, record)
    ctx.ui.warn(f"run {record.get('run_id')}: {note}")
    return record


def _verdict_after_kill(ctx: Context, run_dir: Path, record: dict) -> Verdict | None:
    """verdict.judge on an exit 0 (what the last attempt wrote, how the log ends), for a run settled after
    envmgr died."""
    attempts = record.get("attempts")
    started = attempts[-1].get("started") if isinstance(attempts, list) and attempts and isinstance(
        attempts[-1], dict) else None
    try:
        spec = find_method(str(record.get("method")), ctx.config.base_dir)
        started_ns = int(dt.datetime.fromisoformat(str(started)).timestamp()) * 1_000_000_000
    except (UsageError, ValueError):
        return None      # the method is gone or the record has no start: the exit code alone decides
    return judge(spec, run_dir, 0, started_ns, run_dir / records.LOG, dataset=record.get("dataset"))
