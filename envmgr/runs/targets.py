"""Where a run runs: `envmgr run --on NAME` picks a `Target` from `TARGETS`, and `envmgr runs`, `runs show`,
`runs cancel` and `doctor` reach a run's target through the same table. A record names its target by
`scheduler.kind` (envmgr/runs/records.py `target_name`); a record without one is a local run.

Adding a target (Kubernetes, say) is one module (its submission, its job's state, its cancel) and one entry in
`TARGETS`; tests/unit/test_targets.py registers a fake one that runs through the same verbs."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from envmgr.core.errors import UsageError
from envmgr.door.context import Context
from envmgr.runs import records, slurm
from envmgr.runs.plan import RunRequest
from envmgr.runs.run import run as run_locally
from envmgr.runs.settle import owner_alive

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


class LocalTarget:
    """This host's engine: `envmgr run` runs the container and follows it to its end (envmgr/runs/run.py)."""

    name = records.LOCAL
    hands_over = False

    def submit(self, ctx: Context, request: RunRequest, options: Mapping[str, Any]) -> dict:
        if options.get("sign") is not None:
            raise UsageError("--sign is for --on slurm (it signs the archive the nodes import)")
        return run_locally(ctx, request)

    def follow(self, ctx: Context, record: dict, timeout: float | None = None) -> dict:
        return record     # the envmgr that ran it followed it (its record is its verdict)

    def refresh(self, runs: list[dict]) -> None:
        return None       # the record is the truth; a dead envmgr's run is settled when it is read

    def cancel(self, ctx: Context, record: dict) -> dict:
        raise UsageError(f"run {record['run_id']} is a local run: stop it with Ctrl-C (or SIGTERM) where it runs")

    def alive(self, record: dict) -> bool:
        return owner_alive(record)

    def doctor_checks(self, base_dir: Path) -> list[Row]:
        return []         # the engine and the GPU runtime are doctor's own first rows

    def where(self, record: dict) -> str:
        return "local"

    def handed_over(self, record: dict) -> tuple[str, dict[str, Any]]:
        return "this host's engine", {}


class SlurmTarget:
    """The site's Slurm (envmgr/runs/slurm.py): sbatch, one node-local run per job step."""

    name = "slurm"
    hands_over = True

    def submit(self, ctx: Context, request: RunRequest, options: Mapping[str, Any]) -> dict:
        fields = {k: v for k, v in options.items() if k in slurm.SlurmRequest.__dataclass_fields__}
        return slurm.submit(ctx, request, slurm.SlurmRequest(**fields))

    def follow(self, ctx: Context, record: dict, timeout: float | None = None) -> dict:
        run_dir = ctx.config.base_dir / "runs" / record["method"] / record["run_id"]
        return slurm.follow(ctx, run_dir, str(record["scheduler"]["job_id"]), timeout)

    def refresh(self, runs: list[dict]) -> None:
        slurm.refresh(runs)

    def cancel(self, ctx: Context, record: dict) -> dict:
        return slurm.cancel(ctx, record)

    def alive(self, record: dict) -> bool:
        # Slurm still has the job (or does not answer): its steps own the record; else as a local run's
        return slurm.job_alive(record["scheduler"]) is not False or owner_alive(record)

    def doctor_checks(self, base_dir: Path) -> list[Row]:
        return slurm.doctor_checks(base_dir)

    def where(self, record: dict) -> str:
        return f"slurm job {record['scheduler'].get('job_id')}"

    def handed_over(self, record: dict) -> tuple[str, dict[str, Any]]:
        job_id = record["scheduler"]["job_id"]
        return f"Slurm job {job_id}", {"job_id": job_id}


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
