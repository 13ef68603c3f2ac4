"""Where a run runs: `envmgr run --on NAME` picks a `Target` from `TARGETS`, and `envmgr runs`, `runs show`,
`runs cancel` and `doctor` reach a run's target through the same table. A record names its target by
`scheduler.kind` (envmgr/runs/records.py `target_name`); a record without one is a local run.

Adding a target (Kubernetes, say) is one module (its submission, its job's state, its cancel, and a class with
the `Target` methods, as `LocalTarget` in run.py and `SlurmTarget` in slurm.py) and one entry in `TARGETS`;
tests/unit/test_targets.py registers a fake one that runs through the same verbs."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from envmgr.core.errors import UsageError
from envmgr.door.context import Context
from envmgr.runs import records
from envmgr.runs.plan import RunRequest
from envmgr.runs.run import LocalTarget
from envmgr.runs.slurm import SlurmTarget

Row = tuple[str, str, bool]   # a `envmgr doctor` row: check, what it found, ok


class Target(Protocol):
    """A place runs run. `submit` returns the run's record: ended (the target followed it), or, for a target that
    `hands_over`, as it was handed over: `follow` follows it to its verdict, `refresh` says its state later."""

    name: str
    hands_over: bool     # submit returns once the target has the run (else once the run has ended)

    def submit(self, ctx: Context, request: RunRequest, options: Mapping[str, Any]) -> dict:
        """Start the run; `options` are the `--on`-specific flags of `envmgr run` (each target takes its own)."""
        ...

    def follow(self, ctx: Context, record: dict, timeout: float | None = None) -> dict:
        """A handed-over run followed to its end: its log and progress, then its verdict (raised unless it
        succeeded, as a local run's). `timeout`: seconds it may wait to start."""
        ...

    def refresh(self, runs: list[dict]) -> None:
        """This target's records (still active by what they say) updated in place to the target's state now."""
        ...

    def cancel(self, ctx: Context, record: dict) -> dict:
        """Stop the run (checkpoints kept: `interrupted`); its record after."""
        ...

    def alive(self, record: dict) -> bool:
        """Whether something still owns a `running` record (else the next envmgr settles it, envmgr/runs/settle.py)."""
        ...

    def doctor_checks(self, base_dir: Path) -> list[Row]:
        """Rows for `envmgr doctor` (informational: only `--on NAME` needs them)."""
        ...

    def where(self, record: dict) -> str:
        """The `where` column of `envmgr runs`."""
        ...

    def handed_over(self, record: dict) -> tuple[str, dict[str, Any]]:
        """What `envmgr run` says of a run it handed over: words, and the fields of its `--json` line."""
        ...


TARGETS: dict[str, Target] = {target.name: target for target in (LocalTarget(), SlurmTarget())}


def pick(name: str) -> Target:
    """`--on NAME`: a target of the table, or a usage error that names them."""
    if name not in TARGETS:
        names = list(TARGETS)
        said = " or ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
        raise UsageError(f"--on {name!r}: expected {said}")
    return TARGETS[name]


def of(record: dict) -> Target:
    """The target a record names; a record of a target this envmgr lacks is treated as a local run."""
    return TARGETS.get(records.target_name(record)) or TARGETS[records.LOCAL]
