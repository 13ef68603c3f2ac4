"""Run records (`run.json`) and run logs (`log.txt`): envmgr's own truth about a run.

Both live in the run directory on the host, outside every mount a container gets: a method can
write only `output/` and its scratch `work/`. Every write here refuses to follow a symbolic link
(`O_NOFOLLOW`, a fresh temp file made with `O_EXCL`), so a link planted by an older envmgr's run,
or by anyone else, never turns envmgr's writes into writes elsewhere.

run.json is read and written here only, through `RunRecord` (its keys, a `Status` and the `layout`
version): a record is checked on the way in and on the way out, and comes back as the plain dict the
verbs, `--json` and users read. A record from an older envmgr (no `layout`, fields it did not know)
still reads; what was in the file is what is written back (no key is added by the model's defaults).
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from envmgr.core import names
from envmgr.core.errors import EnvmgrError, UsageError
from envmgr.core.files import atomic_write

RECORD = "run.json"
LOG = "log.txt"
OUTPUT = "output"
WORK = "work"
LAYOUT = 2            # 2: only output/ and work/ are mounted; run.json and log.txt are envmgr's alone

RUN_ID_RE = names.RUN_ID
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
LOCAL = "local"       # the target of a record without `scheduler.kind`


class Status(StrEnum):
    """A run's `status` in run.json (the values are the strings run.json has always held)."""

    PENDING = "pending"          # handed to a scheduler, no step started yet
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    INTERRUPTED = "interrupted"  # Ctrl-C, SIGTERM, `runs cancel`: checkpoints kept, --resume continues


ACTIVE = (Status.PENDING, Status.RUNNING)
TERMINAL = (Status.SUCCEEDED, Status.FAILED, Status.INTERRUPTED)


class RunRecord(BaseModel):
    """run.json. The fields every run has are typed; the rest (image, model, dataset, inputs, scheduler,
    attempts, verdict, ...) are kept as written (`extra="allow"`), so an older or newer record round-trips."""

    model_config = ConfigDict(extra="allow")

    layout: int = 1                      # absent before layout 2 (only output/ and work/ mounted)
    run_id: str
    method: str
    status: Status | str                 # a status this envmgr does not know is kept, never rewritten
    started: str | None = None
    ended: str | None = None
    exit_code: int | None = None
    reason: str | None = None
    attempts: list[Any] | None = None
    scheduler: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        """The record as run.json holds it: only the keys it was made or read with."""
        return self.model_dump(mode="json", exclude_unset=True)


def target_name(record: dict[str, Any]) -> str:
    """Where a run runs (`--on`): its scheduler's kind; a record without one is a local run."""
    scheduler = record.get("scheduler")
    kind = scheduler.get("kind") if isinstance(scheduler, dict) else None
    return kind if isinstance(kind, str) and kind else LOCAL


def _checked(record: dict[str, Any], path: Path) -> dict[str, Any]:
    try:
        return RunRecord.model_validate(record).as_dict()
    except ValidationError as exc:
        problem = exc.errors()[0]
        where = ".".join(str(p) for p in problem["loc"])
        raise UsageError(f"{path}: not a valid run record ({where}: {problem['msg']})") from None


def check_run_id(run_id: str) -> str:
    if not names.is_valid(RUN_ID_RE, run_id):
        raise UsageError(f"{run_id!r} is not a run id (they look like 20261129-204839-1a2b)",
                         hint="`envmgr runs` lists them")
    return run_id


def write_record(run_dir: Path, record: dict[str, Any], name: str = RECORD) -> None:
    """Replace `run_dir/run.json` (or a Slurm rank's `name`) atomically: a fresh temp file (O_EXCL)
    renamed over it, so a link there is replaced itself, never followed."""
    checked = _checked(record, run_dir / name)
    atomic_write(run_dir / name, json.dumps(checked, indent=1, sort_keys=True))


def save(run_dir: Path, record: dict[str, Any], name: str, when: str) -> None:
    """write_record, with a write that fails (a full disk) said as envmgr's error: which run, which file, when."""
    try:
        write_record(run_dir, record, name)
    except OSError as exc:
        raise EnvmgrError(f"run {record.get('run_id')}: cannot write {run_dir / name} {when} ({exc.strerror})",
                          hint="free space there; `envmgr runs` settles the run once envmgr can write it"
                          if exc.errno == errno.ENOSPC else None) from None


def read_record(run_dir: Path) -> dict[str, Any]:
    """The record of one run; a link, a non-object or a record without its keys is refused."""
    path = run_dir / RECORD
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW)
    except FileNotFoundError:
        raise UsageError(f"no run record at {path}") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the run record ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as fh:
        raw = fh.read(16 << 20)
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: not a valid run record ({exc})") from None
    if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("run_id", "method", "status")):
        raise UsageError(f"{path}: not a valid run record (run_id, method and status missing)")
    return _checked(record, path)


def open_log(run_dir: Path, name: str = LOG):
    """`log.txt` (or a Slurm rank's `name`) for appending, never through a link."""
    try:
        fd = os.open(run_dir / name, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW, 0o644)
    except OSError as exc:
        raise UsageError(f"{run_dir / name}: envmgr will not append to it ({exc.strerror}: a link planted there?)",
                         hint="remove it, then run again") from None
    return os.fdopen(fd, "a", encoding="utf-8", errors="replace")


@dataclass
class Malformed:
    path: Path
    reason: str


def iter_records(runs_root: Path, method: str | None = None) -> Iterator[tuple[Path, dict[str, Any] | Malformed]]:
    """Every run directory under `runs_root` with its record, or why it could not be read."""
    if not runs_root.is_dir():
        return
    for method_dir in sorted(runs_root.iterdir()):
        if method and method_dir.name != method:
            continue
        if not method_dir.is_dir() or method_dir.is_symlink():
            continue
        for run_dir in sorted(method_dir.iterdir()):
            if not names.is_valid(RUN_ID_RE, run_dir.name) or run_dir.is_symlink() or not run_dir.is_dir():
                continue
            try:
                yield run_dir, read_record(run_dir)
            except UsageError as exc:
                yield run_dir, Malformed(run_dir / RECORD, exc.message)
