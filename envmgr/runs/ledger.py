"""The runs under a base dir, as the verbs show them (`envmgr runs`, `runs show`, `runs cancel`, `gc`): every
readable record, a stale `running` one settled (envmgr/runs/settle.py) once its target says nothing owns it,
and active ones refreshed by their target (envmgr/runs/targets.py)."""

from __future__ import annotations

from pathlib import Path

from envmgr.core.errors import EnvmgrError, UsageError
from envmgr.door.context import Context
from envmgr.runs import records, settle as settling, targets
from envmgr.runs.records import check_run_id


def settle(ctx: Context, run_dir: Path, record: dict) -> dict:
    """settle.settle, with the record's target saying whether its run is still owned."""
    return settling.settle(ctx, run_dir, record, alive=targets.of(record).alive)


def list_runs(ctx: Context, method: str | None = None) -> list[dict]:
    """Every readable run record (stale `running` ones settled); a malformed one is named and skipped."""
    found = []
    for run_dir, record in records.iter_records(ctx.config.base_dir / "runs", method):
        if isinstance(record, records.Malformed):
            ctx.ui.warn(f"skipping {record.path}: {record.reason}")
            continue
        try:
            record = settle(ctx, run_dir, record)
        except EnvmgrError as exc:
            ctx.ui.warn(f"run {record['run_id']}: could not settle its state ({exc.message})")
        found.append(record)
    return found


def find_run(ctx: Context, run_id: str) -> dict:
    check_run_id(run_id)
    for run_dir, record in records.iter_records(ctx.config.base_dir / "runs"):
        if run_dir.name != run_id:
            continue
        if isinstance(record, records.Malformed):
            raise UsageError(f"{record.path}: {record.reason}")
        return {**settle(ctx, run_dir, record), "run_dir": str(run_dir)}
    raise UsageError(f"no run {run_id!r} under {ctx.config.base_dir / 'runs'}", hint="`envmgr runs` lists them")


def refresh(runs: list[dict]) -> list[dict]:
    """Each target's active runs, their state as the target sees it now (in place)."""
    for target in targets.TARGETS.values():
        mine = [r for r in runs if targets.of(r) is target]
        if mine:
            target.refresh(mine)
    return runs


def cancel(ctx: Context, run_id: str) -> dict:
    """`envmgr runs cancel RUN`: its target stops it."""
    record = find_run(ctx, run_id)
    return targets.of(record).cancel(ctx, record)
