"""`envmgr run METHOD --on slurm`: the same image, mounts and run record as a local run, handed to the
site's Slurm instead of the local engine. envmgr has no queue of its own: sbatch schedules, srun starts
one job step per machine, and each step is `envmgr slurm-step`, a node-local `envmgr run` through that
node's own Docker Engine (run.py's `NodeStep` hook), so mounts, uid:gid, read-only models, labels and
the GPU check are the local run's code (envmgr/runs/run.py; the request and its plan: envmgr/runs/plan.py).
`SlurmTarget` in envmgr/runs/targets.py is how the verbs reach this module.

The run directory is the hand-over: the submission writes `job.sbatch` and `run.json` (status
`pending`, `scheduler.job_id`) into it; the steps update `run.json` as a local run does; the batch
script's last line (`slurm-step --finish`) records a job that ended without a step's record. So the
base directory must be on storage every node shares.

The image reaches a node by content hash: pulled from the site registry (`--registry`), or imported from
an export archive in `<base_dir>/exports/` (written at submission once per inputs hash), and checked by
that hash. Multi-machine runs use accelerate's multi-machine launch over the host network.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from envmgr.build import build as build_module, target as build_target
from envmgr.core import paths
from envmgr.core.errors import EnvmgrError, Exit, Interrupted, UsageError
from envmgr.core.files import open_lock
from envmgr.core.spec import MethodSpec, find_method
from envmgr.door.context import Context
from envmgr.runs import outputs as run_outputs, owned, records
from envmgr.runs.plan import (
    NodeStep,
    RunRequest,
    end_attempt,
    given,
    ids,
    inputs_record,
    method_command,
    new_run_id,
    now,
    prepare_base_dir,
    progress_event,
    refusal_recorded,
    run_data,
    run_user,
)
from envmgr.runs.records import ACTIVE, TERMINAL, Status
from envmgr.runs.run import run as run_locally
from envmgr.runs.settle import owner_alive
from envmgr.runs.verdict import Verdict, describe as describe_verdict, judge

SCRIPT = "job.sbatch"
EXPORTS = "exports"
SLURM_ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING",
                "SIGNALING", "STAGE_OUT"}
SHARED_FILESYSTEMS = {"nfs", "nfs4", "lustre", "gpfs", "beegfs", "cephfs", "ceph", "cifs", "smb3", "glusterfs",
                      "fuse.glusterfs", "fuse.sshfs", "fuse.juicefs", "fuse.beegfs", "9p", "virtiofs", "wekafs"}
SLURM_HINT = "install Slurm's client commands (Debian: slurm-client) and point SLURM_CONF at the site's slurm.conf"


class SlurmError(EnvmgrError):
    """Slurm is missing, does not answer, or refused the job."""


@dataclass
class SlurmRequest:
    nodes: int = 1
    gpus_per_node: int | None = None      # None: 1 for methods that need a GPU, else 0
    tasks_per_node: int = 1               # machines per node (accelerate machines; 2 = two containers)
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    registry: str | None = None
    runtime: str = "docker"               # docker (a step per machine through its engine) | pyxis (enroot)
    sign: Path | None = None              # private key that signs the export archive the nodes import

    @property
    def machines(self) -> int:
        return self.nodes * self.tasks_per_node


# ---------------------------------------------------------------------- Slurm's commands


def _slurm(args: list[str], check: bool = True) -> subprocess.CompletedProcess:
    if shutil.which(args[0]) is None:
        raise SlurmError(f"Slurm not found: no `{args[0]}` on PATH", hint=SLURM_HINT, exit_code=Exit.USAGE)
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        why = _first_error(proc.stderr) or f"exit {proc.returncode}"
        raise SlurmError(f"`{' '.join(args[:2])}` failed: {why}")
    return proc


def _first_error(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line.split("error:", 1)[1].strip() for line in lines if "error:" in line]
    return errors[-1] if errors else (lines[-1] if lines else "")


def partitions() -> list[str]:
    """The cluster's partitions (the default one marked by Slurm's `*` is returned without it)."""
    proc = _slurm(["sinfo", "-h", "-o", "%P"], check=False)
    if proc.returncode != 0:
        raise SlurmError(f"Slurm does not answer: {_first_error(proc.stderr) or 'sinfo failed'}",
                         hint="is slurmctld up? `envmgr doctor` shows what envmgr sees")
    return sorted({p.strip().rstrip("*") for p in proc.stdout.split() if p.strip()})


def job_states(job_ids: list[str], strict: bool = False) -> dict[str, tuple[str, str]]:
    """job id -> (Slurm state, reason) for the jobs Slurm still knows. `strict`: a Slurm that does not
    answer raises SlurmError (else its jobs are merely missing from the answer)."""
    states: dict[str, tuple[str, str]] = {}
    if not job_ids:
        return states
    proc = _slurm(["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i|%T|%r"], check=False)
    if strict and proc.returncode != 0 and "invalid job id" not in proc.stderr.lower():
        raise SlurmError(f"Slurm does not answer: {_first_error(proc.stderr) or 'squeue failed'}")
    for line in proc.stdout.splitlines():
        parts = line.split("|")
        if len(parts) == 3:
            states[parts[0]] = (parts[1], parts[2])
    for job in (j for j in job_ids if j not in states):
        shown = _slurm(["scontrol", "show", "job", "-o", job], check=False)
        fields = dict(f.split("=", 1) for f in shown.stdout.split() if "=" in f)
        if "JobState" in fields:
            states[job] = (fields["JobState"], fields.get("Reason", ""))
    return states


def hostnames(nodelist: str) -> list[str]:
    if shutil.which("scontrol") is None:
        return [nodelist]
    proc = _slurm(["scontrol", "show", "hostnames", nodelist], check=False)
    return proc.stdout.split() if proc.returncode == 0 else [nodelist]


def node_address(node: str) -> str:
    """A node's NodeAddr (what its peers reach it by), else its name."""
    if shutil.which("scontrol") is None:
        return node
    proc = _slurm(["scontrol", "show", "node", "-o", node], check=False)
    fields = dict(f.split("=", 1) for f in proc.stdout.split() if "=" in f)
    return fields.get("NodeAddr") or node


# ---------------------------------------------------------------------- submission


def submit(ctx: Context, request: RunRequest, slurm: SlurmRequest) -> dict:
    """Check, write run.json + job.sbatch into a run dir, sbatch it: the record, `pending` (`--wait`: `follow`)."""
    spec: MethodSpec = request.method
    gpus_per_node = _check_request(request, spec, slurm)
    base_dir = ctx.config.base_dir
    prepare_base_dir(base_dir)
    wanted = build_target.target(ctx, spec)
    inputs_hash, tag = wanted.digest, wanted.tag
    image_id = ctx.engine.image_id(tag)
    if image_id is None and not slurm.registry:   # the nodes get it from an archive this host writes
        image_id = build_module.build(ctx, spec).image_id
    image_source = _image_source(ctx, spec, tag, inputs_hash, slurm)

    previous: dict | None = None
    if request.resume:
        run_id, run_dir, previous, args = _resubmit(ctx, spec, request.resume)
    else:
        run_id = new_run_id()
        run_dir = base_dir / "runs" / spec.name / run_id
        args = list(request.args)
    data = run_data(base_dir, request, previous)
    # --input and --env as given (on --resume without them: as recorded), recorded for the job steps to apply
    inputs, user_env = given(request, previous, run_dir)
    as_root = request.as_root or bool(previous and previous.get("as_root"))
    run_dir.mkdir(parents=True, exist_ok=request.resume is not None)
    with refusal_recorded(run_dir, previous, records.RECORD):   # a new run that fails here leaves no run dir
        if slurm.runtime == "pyxis":      # a docker step makes them itself, owned by the user its container runs as
            for sub in (records.OUTPUT, records.WORK):
                owned.ensure_folder(run_dir, sub, ids(run_user(ctx, as_root)))   # never through a link
        # the dataset as the method's dataset_mode asks, extracted here into the shared run dir: the steps find it
        prepared = data.prepare(spec, run_dir, run_user(ctx, as_root))

    network = "host" if slurm.machines > 1 else request.network
    record = previous or {}
    jobs = list((record.get("scheduler") or {}).get("jobs", []))
    scheduler = {"kind": "slurm", "job_id": None, "jobs": jobs, "nodes": [], "nodes_requested": slurm.nodes,
                 "tasks_per_node": slurm.tasks_per_node, "machines": slurm.machines,
                 "gpus_per_node": gpus_per_node, "partition": slurm.partition, "time": slurm.time,
                 "account": slurm.account, "runtime": slurm.runtime, "image_source": image_source,
                 "script": SCRIPT, "submitted": now()}
    record.update({
        "run_id": run_id, "method": spec.name, "image": {"id": image_id, "tag": tag},
        "layout": records.LAYOUT, "lock_hash": wanted.lock_hash, "inputs_hash": inputs_hash,
        **data.record(prepared, run_dir, ctx.cache_dir),
        "inputs": inputs_record(inputs, ctx.cache_dir),
        "env": user_env,
        "arguments": args, "gpus": f"{gpus_per_node} per node", "network": network,
        "shm_size": request.shm_size, "memory": request.memory, "as_root": as_root,
        "variant": request.variant or (previous or {}).get("variant"),
        "status": Status.PENDING, "exit_code": None, "reason": None, "ended": None, "scheduler": scheduler,
    })
    record.setdefault("attempts", []).append({"started": None, "ended": None, "status": Status.PENDING})
    record.setdefault("started", None)
    records.write_record(run_dir, record)
    script = batch_script(ctx, spec, record, run_dir, slurm)
    (run_dir / SCRIPT).write_text(script)

    started = time.monotonic()
    proc = _slurm(["sbatch", "--parsable", str(run_dir / SCRIPT)], check=False)
    if proc.returncode != 0:
        record.update(status=Status.FAILED, ended=now(), reason=f"sbatch: {_first_error(proc.stderr)}")
        end_attempt(record, Status.FAILED)
        records.write_record(run_dir, record)
        raise SlurmError(f"Slurm refused the job: {_first_error(proc.stderr) or 'sbatch failed'}")
    job_id = proc.stdout.strip().split(";")[0]
    _update(run_dir, lambda r: (r["scheduler"].update(job_id=job_id, jobs=jobs + [job_id]),
                                r["attempts"][-1].update(job_id=job_id)))
    ctx.ui.step(f"run {run_id}: {spec.name} submitted as Slurm job {job_id} ({slurm.nodes} node(s) × "
                f"{slurm.tasks_per_node} task(s), {gpus_per_node} GPU(s) per node, image by {image_source['kind']}) "
                f"in {time.monotonic() - started:.2f} s", run_id=run_id, run_dir=str(run_dir), job_id=job_id)
    return _read(run_dir)


def _resubmit(ctx: Context, spec: MethodSpec, resume: str) -> tuple[str, Path, dict, list[str]]:
    """`--resume RUN --on slurm`: the run's record (read as on a local --resume), not active in Slurm."""
    run_id = records.check_run_id(resume)
    run_dir = ctx.config.base_dir / "runs" / spec.name / run_id
    if run_dir.is_symlink() or not (run_dir / records.RECORD).is_file():
        raise UsageError(f"no run {run_id!r} of {spec.name} under {run_dir.parent}", hint="`envmgr runs` lists them")
    previous = records.read_record(run_dir)
    if previous.get("method") != spec.name or previous.get("run_id") != run_id:
        raise UsageError(f"{run_dir / records.RECORD} does not describe run {run_id} of {spec.name}")
    job_id = (previous.get("scheduler") or {}).get("job_id")
    if previous.get("status") in ACTIVE and job_id:
        state = job_states([str(job_id)]).get(str(job_id))
        if state and state[0] in SLURM_ACTIVE:
            raise UsageError(f"run {run_id} is still {state[0].lower()} as Slurm job {job_id}",
                             hint=f"`envmgr runs cancel {run_id}` first")
    recorded = previous.get("arguments")
    if not isinstance(recorded, list) or not all(isinstance(a, str) for a in recorded):
        raise UsageError(f"{run_dir / records.RECORD}: its arguments are not a list of strings")
    return run_id, run_dir, previous, recorded + ([] if "--resume" in recorded else ["--resume"])


def _check_request(request: RunRequest, spec: MethodSpec, slurm: SlurmRequest) -> int:
    """Bad input in one line, before anything is written; returns the GPUs per node."""
    if slurm.nodes < 1:
        raise UsageError(f"--nodes {slurm.nodes}: a Slurm run needs at least 1 node")
    if slurm.tasks_per_node < 1:
        raise UsageError(f"--tasks-per-node {slurm.tasks_per_node}: needs at least 1")
    if slurm.gpus_per_node is not None and slurm.gpus_per_node < 0:
        raise UsageError(f"--gpus-per-node {slurm.gpus_per_node}: expected 0 or more")
    if request.gpus:
        raise UsageError("--gpus is for local runs; with --on slurm GPUs come from the allocation: "
                         "--gpus-per-node G")
    if request.files:
        raise UsageError("--file is for local runs for now: a Slurm job's steps do not place files into the "
                         "method's folder", hint="run it on this host (without --on slurm)")
    if slurm.runtime not in ("docker", "pyxis"):
        raise UsageError(f"--node-runtime {slurm.runtime!r}: expected docker or pyxis")
    known = partitions()
    if slurm.partition and slurm.partition not in known:
        raise UsageError(f"partition {slurm.partition!r} is not known to Slurm (partitions: {', '.join(known)})")
    gpus_per_node = slurm.gpus_per_node if slurm.gpus_per_node is not None else (1 if spec.gpu == "required" else 0)
    if gpus_per_node and gpus_per_node % slurm.tasks_per_node:
        raise UsageError(f"--gpus-per-node {gpus_per_node} does not split into {slurm.tasks_per_node} tasks per node")
    return gpus_per_node


def _image_source(ctx: Context, spec: MethodSpec, tag: str, inputs_hash: str, slurm: SlurmRequest) -> dict:
    """How a node that lacks the image gets it, checked now: the registry has the tag, or an archive exists."""
    if slurm.sign and (slurm.registry or slurm.runtime == "pyxis"):
        raise UsageError("--sign signs the export archive the nodes import; "
                         + ("with --registry, sign the push: `envmgr push --sign KEY`" if slurm.registry
                            else "an enroot image for pyxis carries no signature"))
    if slurm.registry:
        from envmgr.ship.registry import _check_registry

        registry = _check_registry(slurm.registry)
        remote = f"{registry}/{spec.image_repository}:{tag.rsplit(':', 1)[1]}"
        if not ctx.engine.registry_has(remote):
            raise UsageError(f"registry {registry} has no {remote}: the nodes could not get the image",
                             hint=f"`envmgr push {spec.name} {registry}` first, or submit without --registry "
                                  "to use an export archive in the base dir")
        return {"kind": "registry", "registry": registry, "reference": remote}
    if slurm.runtime == "pyxis":
        from envmgr.ship.squashfs import export_squashfs

        out = ctx.config.base_dir / EXPORTS / f"{spec.name}-{inputs_hash[:16]}.sqsh"
        if not out.is_file():
            ctx.ui.step(f"writing the enroot image {out} (once per inputs hash)")
            export_squashfs(ctx, spec.name, out)
        return {"kind": "squashfs", "file": str(out)}
    from envmgr.ship.transfer import export

    out = ctx.config.base_dir / EXPORTS / f"{spec.name}-{inputs_hash[:16]}.envmgr.tar"
    wanted_key = _signing_key_id(slurm.sign) if slurm.sign else None
    signed_by = _archive_signer(ctx, out) if out.is_file() else None
    if not out.is_file() or (wanted_key and signed_by != wanted_key):
        ctx.ui.step(f"exporting {tag} to {out} for the nodes (once per inputs hash"
                    + (f", signed by {wanted_key})" if wanted_key else ")"))
        out.parent.mkdir(parents=True, exist_ok=True)
        signed_by = export(ctx, spec.name, out, sign=slurm.sign).signed_by   # under a temp name, then renamed
    if ctx.config.trust.require_signature and signed_by is None:
        raise UsageError(f"{out} is not signed and [trust] require_signature is set: the nodes would refuse it",
                         hint="submit with `--sign KEY` (the private key whose public half the nodes list in "
                              "[trust] keys)")
    return {"kind": "archive", "file": str(out), "signed_by": signed_by}


def _signing_key_id(path: Path) -> str:
    from envmgr.ship import signing

    return signing.key_id(signing.load_private_key(path).public_key())


def _archive_signer(ctx: Context, archive: Path) -> str | None:
    """The key that validly signed an archive in the exports folder (trusted here or not), or None."""
    from envmgr.ship import signing
    from envmgr.ship.transfer import ArchiveError, read_signed_manifest

    try:
        _, statement, signature = read_signed_manifest(archive)
    except (ArchiveError, OSError):
        return None
    found = signing.check(statement, signature, ctx.config.trust)
    return found.key_id if found.state in ("trusted", "untrusted") else None


def batch_script(ctx: Context, spec: MethodSpec, record: dict, run_dir: Path, slurm: SlurmRequest) -> str:
    """The sbatch script, kept in the run dir: plain enough to read and to resubmit by hand."""
    sched = record["scheduler"]
    lines = ["#!/bin/bash",
             f"# envmgr run {record['run_id']} of {spec.name}: written by `envmgr run --on slurm`, one job per run.",
             f"#SBATCH --job-name=envmgr-{spec.name}",
             f"#SBATCH --nodes={slurm.nodes}",
             f"#SBATCH --ntasks-per-node={slurm.tasks_per_node}",
             f"#SBATCH --output={run_dir}/slurm-%j.out",
             "#SBATCH --open-mode=append",
             f"#SBATCH --chdir={run_dir}"]
    if sched["gpus_per_node"]:
        lines.append(f"#SBATCH --gpus-per-node={sched['gpus_per_node']}")
    for flag, value in (("partition", slurm.partition), ("time", slurm.time), ("account", slurm.account)):
        if value:
            lines.append(f"#SBATCH --{flag}={value}")
    envmgr = f"{_quote(sys.executable)} -m envmgr"
    lines += ["", "set -u", f"export ENVMGR_BASE_DIR={_quote(str(ctx.config.base_dir))}"]
    if os.environ.get("ENVMGR_CACHE_DIR"):
        lines.append(f"export ENVMGR_CACHE_DIR={_quote(str(ctx.config.cache_dir))}")
    if slurm.runtime == "pyxis":
        lines += pyxis_step(spec, record, run_dir)
    else:
        lines.append(f"srun --kill-on-bad-exit=0 --ntasks-per-node={slurm.tasks_per_node} "
                     f"{envmgr} slurm-step {_quote(str(run_dir))}")
    lines += ["status=$?",
              f"{envmgr} slurm-step {_quote(str(run_dir))} --finish \"$status\"",
              'exit "$status"', ""]
    return "\n".join(lines)


def pyxis_step(spec: MethodSpec, record: dict, run_dir: Path) -> list[str]:
    """An `srun --container-image=` step for pyxis/enroot sites (nodes without a Docker Engine).

    Not run here: pyxis and enroot cannot be installed on the machines envmgr is tested on.
    """
    from envmgr.runs.datasets import recorded as recorded_dataset
    from envmgr.runs.inputs import recorded_env, recorded_inputs
    image = record["scheduler"]["image_source"]["file"]
    # as a local run: only output/ and the scratch work/ are writable; run.json and log.txt are not mounted
    mounts = [f"{run_dir / records.WORK}:{paths.CONTAINER_RUN}",
              f"{run_dir / records.OUTPUT}:{paths.CONTAINER_RUN}/output"]
    if record.get("model"):
        mounts.append(f"{record['model']['path']}:{paths.CONTAINER_MODELS}/{record['model']['name']}:ro")
    exports = f"export ENVMGR_RUN_ID={_quote(record['run_id'])} ENVMGR_OUTPUT_DIR={paths.CONTAINER_RUN}/output " \
              "HF_HUB_OFFLINE=1"
    if record.get("dataset"):
        dataset = recorded_dataset(record["dataset"], run_dir)    # the copy its dataset_mode made, or as given
        mounts.append(f"{dataset.path}:{dataset.target}" + (":ro" if dataset.read_only else ""))
        exports += f" ENVMGR_DATASET_PATH={_quote(dataset.target)}"
    inputs = recorded_inputs(record, run_dir)
    mounts += [f"{i.path}:{i.target}:ro" for i in inputs]
    if inputs:
        exports += f" ENVMGR_INPUTS_DIR={paths.CONTAINER_INPUTS}"
    exports += "".join(f" {name}={_quote(value)}" for name, value in recorded_env(record, run_dir).items())
    command = method_command(spec) + [f"--train_id={record['run_id']}",
                                      f"--output_dir={paths.CONTAINER_RUN}/output"] + record["arguments"]
    return [exports,
            f"srun --container-image={_quote(image)} --container-mounts={_quote(','.join(mounts))} "
            f"--container-workdir={paths.CONTAINER_RUN} --no-container-mount-home "
            + " ".join(_quote(word) for word in command) + f" >> {_quote(str(run_dir / 'log.txt'))} 2>&1"]


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


# ---------------------------------------------------------------------- following a job


def follow(ctx: Context, run_dir: Path, job_id: str, wait_timeout: float | None = None) -> dict:
    """Follow a submitted job like a local run: its log and progress, then the record's verdict."""
    log = run_dir / "log.txt"
    offset = log.stat().st_size if log.is_file() else 0
    submitted = time.monotonic()
    state, reason = "PENDING", ""
    said_running = False
    try:
        while True:
            state, reason = job_states([job_id]).get(job_id, ("GONE", ""))
            if state == "PENDING" and wait_timeout is not None and time.monotonic() - submitted > wait_timeout:
                _slurm(["scancel", job_id], check=False)
                _mark(run_dir, Status.FAILED, f"pending for more than {wait_timeout:g} s ({reason}); cancelled")
                raise SlurmError(f"job {job_id} still pending after {wait_timeout:g} s (reason: {reason or 'none'}); "
                                 "cancelled it", hint="try another --partition, or a longer --wait-timeout")
            if state == "RUNNING" and not said_running:
                nodes = ", ".join(_read(run_dir)["scheduler"].get("nodes") or []) or "its node(s)"
                ctx.ui.info(f"job {job_id} running on {nodes}")
                said_running = True
            offset = _show_new_lines(ctx, log, offset)
            record = _read(run_dir)
            if state not in SLURM_ACTIVE and record.get("status") in TERMINAL:
                break
            if state not in SLURM_ACTIVE and state != "GONE" and time.monotonic() - submitted > 5:
                # the batch script's --finish writes the verdict; give it a moment, then say what Slurm says
                time.sleep(1.0)
                record = _read(run_dir)
                if record.get("status") not in TERMINAL:
                    _mark(run_dir, Status.FAILED, f"job {job_id} ended {state} and no step wrote to {run_dir}: is the "
                          "base dir on storage the nodes share, and can the job write it there?")
                break
            if state == "GONE" and time.monotonic() - submitted > 5:
                _mark(run_dir, Status.FAILED, f"Slurm no longer knows job {job_id}; no step wrote a record")
                break
            time.sleep(0.3)
    except KeyboardInterrupt:
        raise Interrupted(f"stopped following job {job_id}; it goes on in Slurm",
                          hint=f"`envmgr runs cancel {run_dir.name}` stops it") from None
    return verdict(run_dir)


def _show_new_lines(ctx: Context, log: Path, offset: int) -> int:
    """Show the complete lines the log gained since `offset`; returns the new offset."""
    if not log.is_file():
        return offset
    with open(log, "rb") as fh:
        fh.seek(offset)
        chunk = fh.read()
    complete = chunk[:chunk.rfind(b"\n") + 1]
    for line in complete.decode("utf-8", errors="replace").splitlines():
        _show(ctx, line, progress_event(line))
    return offset + len(complete)


def _show(ctx: Context, line: str, event: dict | None) -> None:
    if event is None:
        ctx.ui.log(line)
        return
    ctx.ui.event("method." + str(event.get("event")), **{k: v for k, v in event.items() if k != "event"})
    if event.get("event") == "progress" and ctx.ui.mode != "json":
        step, total = event.get("step"), event.get("max_steps")
        if step == 1 or step == total or (total and step % max(1, total // 10) == 0):
            ctx.ui.info(f"step {step}/{total} loss {event.get('loss', 0):.4f} {event.get('s_per_step', 0):.2f} s/step")


def verdict(run_dir: Path) -> dict:
    record = _read(run_dir)
    run_id, status = record["run_id"], record.get("status")
    if status == Status.SUCCEEDED:
        return record
    if status == Status.INTERRUPTED:
        raise Interrupted(f"run {run_id} interrupted: checkpoints kept in {run_dir / 'output'}",
                          hint=f"continue with `envmgr run {record['method']} --resume {run_id} --on slurm`")
    why = record.get("reason") or f"exit {record.get('exit_code')}"
    tail = _tail(run_dir / "log.txt", 8) or _tail(run_dir / f"slurm-{record['scheduler'].get('job_id')}.out", 8)
    last = "".join(f"\n    {line}" for line in tail)
    judged: dict = record["verdict"] if isinstance(record.get("verdict"), dict) else {}
    raise EnvmgrError(f"run {run_id} failed ({why}); log: {run_dir / records.LOG}"
                      + (f"\n  {describe_verdict(record)}" if record.get("exit_code") == 0 else "")
                      + (f"\n  last lines:{last}" if last else ""), hint=judged.get("hint"))


def _tail(path: Path, count: int) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-count:]
    except OSError:
        return []


# ---------------------------------------------------------------------- state, cancel


def refresh(runs: list[dict]) -> list[dict]:
    """Slurm runs still pending or running by their record: their state as Slurm sees it now."""
    live = [r for r in runs if (r.get("scheduler") or {}).get("kind") == "slurm" and r.get("status") in ACTIVE
            and r["scheduler"].get("job_id")]
    if not live or shutil.which("squeue") is None:
        return runs
    try:
        states = job_states([r["scheduler"]["job_id"] for r in live])
    except (SlurmError, subprocess.SubprocessError):
        return runs
    for record in live:
        state, reason = states.get(record["scheduler"]["job_id"], ("GONE", ""))
        record["scheduler"]["state"] = state
        if state == "PENDING":
            record["status"] = Status.PENDING
            record["scheduler"]["reason"] = reason
        elif state in SLURM_ACTIVE:
            running = record["status"] == Status.RUNNING or state == "RUNNING"
            record["status"] = Status.RUNNING if running else record["status"]
        else:  # ended without a step's verdict (killed, node failure, lost)
            record["status"] = Status.FAILED
            record["reason"] = f"Slurm says {state}; no step wrote a record"
    return runs


def job_alive(scheduler: dict) -> bool | None:
    """Whether Slurm still has the job of a run (pending, running, completing); None when it cannot say.

    `envmgr runs`/`--resume`/`gc` settle a `running` record whose envmgr is gone: a Slurm run's record is
    left alone while its job lives (its steps, on whatever node, own it)."""
    job_id = scheduler.get("job_id")
    if not job_id or shutil.which("squeue") is None:
        return None
    try:
        state = job_states([str(job_id)], strict=True).get(str(job_id))
    except (SlurmError, subprocess.SubprocessError):
        return None
    return state is not None and state[0] in SLURM_ACTIVE


def cancel(ctx: Context, record: dict, wait_s: float = 300.0) -> dict:
    """`envmgr runs cancel` of a Slurm run (its record as `envmgr.runs.ledger.find_run` found it)."""
    run_id = record["run_id"]
    run_dir = Path(record["run_dir"])
    job_id = (record.get("scheduler") or {}).get("job_id")
    if (record.get("scheduler") or {}).get("kind") != "slurm" or not job_id:
        raise UsageError(f"run {run_id} is a local run: stop it with Ctrl-C (or SIGTERM) where it runs")
    if record.get("status") in TERMINAL:
        raise UsageError(f"run {run_id} already {record['status']}")
    state = job_states([job_id]).get(job_id, ("GONE", ""))[0]
    if state == "PENDING" or state not in SLURM_ACTIVE:
        _slurm(["scancel", job_id], check=False)
        _mark(run_dir, Status.INTERRUPTED, "cancelled before it started")
        return _read(run_dir)
    # the steps turn SIGTERM into `interrupted` (checkpoint kept, container stopped); the batch shell is spared
    _slurm(["scancel", "--signal=TERM", job_id])
    ctx.ui.step(f"run {run_id}: asked Slurm job {job_id} to stop (SIGTERM to its steps)")
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        record = _read(run_dir)
        if record.get("status") in TERMINAL:
            return record
        time.sleep(0.3)
    raise SlurmError(f"job {job_id} did not stop within {wait_s:g} s", hint=f"`scancel {job_id}` kills it")


# ---------------------------------------------------------------------- the job step (on a node)


def step(ctx: Context, run_dir: Path) -> dict:
    """One task of the job: get the image by content hash, then a node-local `envmgr run`."""
    record = _read(run_dir)
    rank = int(os.environ.get("SLURM_PROCID", "0"))
    machines = int(os.environ.get("SLURM_NTASKS", "1"))
    local = int(os.environ.get("SLURM_LOCALID", "0"))
    per_node = int(os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0] or 1)
    job_id = os.environ.get("SLURM_JOB_ID", "")
    sched = record["scheduler"]
    if rank == 0:
        nodes = hostnames(os.environ.get("SLURM_JOB_NODELIST", os.environ.get("SLURMD_NODENAME", "")))
        _update(run_dir, lambda r: r["scheduler"].update(nodes=nodes, state="RUNNING",
                                                         job_id=r["scheduler"].get("job_id") or job_id or None))
    spec = find_method(record["method"], ctx.config.base_dir)
    ensure_image(ctx, spec, record)

    gpus = step_gpus(int(sched.get("gpus_per_node") or 0), local, per_node)
    env = {"ENVMGR_MACHINE_RANK": str(rank), "ENVMGR_NUM_MACHINES": str(machines), "SLURM_JOB_ID": job_id}
    if machines > 1:
        env.update(rendezvous_env(rank, machines, job_id, max(1, len(gpus)),
                                  os.environ.get("SLURM_JOB_NODELIST", ""), cpu=not gpus))
    request = RunRequest(method=spec, gpus=gpu_indices(gpus), network=record.get("network") or "none",
                         shm_size=record.get("shm_size"), memory=record.get("memory"),
                         as_root=bool(record.get("as_root")), variant=record.get("variant"),
                         node=NodeStep(run_id=record["run_id"], run_dir=run_dir, rank=rank, env=env))
    return run_locally(ctx, request)


def gpu_indices(ids: list[str]) -> str:
    """Slurm's device ids as `--gpus` text: `none`, or indices (`3,` for the single index 3: `3` is a count)."""
    if not ids:
        return "none"
    return ",".join(ids) + ("," if len(ids) == 1 else "")


def step_gpus(gpus_per_node: int, local: int, per_node: int) -> list[str]:
    """This task's GPUs: the host indices Slurm allocated (never `all`), split among the node's tasks."""
    if not gpus_per_node:
        return []
    for var in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS", "CUDA_VISIBLE_DEVICES"):
        value = os.environ.get(var, "").strip()
        if value and value not in ("NoDevFiles", "void"):
            ids = [g.strip() for g in value.split(",") if g.strip()]
            share = len(ids) // max(1, per_node)
            if share < 1:
                break
            return ids[local * share:(local + 1) * share]
    raise UsageError(f"the job asked for {gpus_per_node} GPU(s) per node but Slurm gave this step none "
                     "(SLURM_JOB_GPUS, CUDA_VISIBLE_DEVICES unset)", hint="check the partition's GRES configuration")


def rendezvous_env(rank: int, machines: int, job_id: str, per_machine: int, nodelist: str,
                   cpu: bool = False) -> dict[str, str]:
    """accelerate's multi-machine launch: rank 0's address, a port from the job id, this machine's rank.

    On the CPU accelerate needs `--cpu`: only then does WORLD_SIZE > 1 make it a gloo (MULTI_CPU) run;
    without it every machine trains alone (measured: sd-demo said "1 process(es)" on each)."""
    first = hostnames(nodelist)[0] if nodelist else "127.0.0.1"
    address = node_address(first)
    port = 20000 + int(job_id or 0) % 20000
    extra = f"--machine_rank={rank} --main_process_ip={address} --main_process_port={port}"
    if cpu:
        extra += " --cpu"
    elif per_machine > 1:
        extra += " --multi_gpu"
    return {"TRAINING_NUM_MACHINES": str(machines), "TRAINING_NUM_PROCESSES": str(machines * per_machine),
            "ACCELERATE_EXTRA_ARGS": extra, "MASTER_ADDR": address, "MASTER_PORT": str(port),
            # one process per machine is launched without torchrun: it reads its rank from these
            "RANK": str(rank), "WORLD_SIZE": str(machines), "LOCAL_RANK": "0", "NODE_RANK": str(rank)}


def ensure_image(ctx: Context, spec: MethodSpec, record: dict) -> None:
    """The run's image on this node, by content hash: present, pulled from the registry, or imported."""
    want = record["image"]
    if _have(ctx, want):
        return
    source = record["scheduler"]["image_source"]
    lock = Path("/tmp") / f"envmgr-image-{want['tag'].rsplit(':', 1)[-1]}.lock"
    with open_lock(lock) as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)   # several tasks of a node: one fetch
        if _have(ctx, want):
            return
        if source["kind"] == "registry":
            from envmgr.ship.registry import pull

            ctx.ui.step(f"pulling {source['reference']} (not on this node)")
            pull(ctx, spec.name, source["registry"])
        elif source["kind"] == "archive":
            from envmgr.ship.transfer import import_archive

            ctx.ui.step(f"importing {source['file']} (not on this node)")
            import_archive(ctx, Path(source["file"]))
        got = ctx.engine.image_id(want["tag"])
        if got is None or (want["id"] and got != want["id"]):
            raise EnvmgrError(f"this node's {want['tag']} is {str(got)[:19]}, not the submitted {want['id'][:19]}",
                              hint="the method's files or lock differ between the submit host and the nodes")


def _have(ctx: Context, want: dict) -> bool:
    """This node's engine has the tag, and (when the submitter knew it) the same image ID."""
    have = ctx.engine.image_id(want["tag"])
    return have is not None and (not want["id"] or have == want["id"])


def finish(run_dir: Path, status: int) -> None:
    """The batch script's last line: a run whose steps wrote no verdict gets one from the job's exit."""
    record = _read(run_dir)
    if record.get("status") in TERMINAL:
        return
    if record.get("scheduler", {}).get("runtime") == "pyxis":
        if status in (130, 143):
            _mark(run_dir, Status.INTERRUPTED, f"exit {status}", exit_code=status,
                  artifacts=run_outputs.artifacts(run_dir))
            return
        judged = _pyxis_verdict(run_dir, record, status)
        _mark(run_dir, judged.status, judged.reason or (None if status == 0 else f"exit {status}"),
              exit_code=status, artifacts=run_outputs.artifacts(run_dir),
              **{k: v for k, v in judged.fields().items() if k != "reason"})
        return
    if status in (130, 143):
        _mark(run_dir, Status.INTERRUPTED, "stopped before its container ran", exit_code=status)
        return
    _mark(run_dir, Status.FAILED, f"the job step ended (exit {status}) without writing the run's record; "
          f"see {run_dir}/slurm-{os.environ.get('SLURM_JOB_ID', '')}.out", exit_code=status)


def _pyxis_verdict(run_dir: Path, record: dict, status: int) -> Verdict:
    """verdict.judge for a pyxis job (no envmgr ran on its node): files written since it was submitted."""
    submitted = (record.get("scheduler") or {}).get("submitted")
    try:
        spec = find_method(str(record.get("method")), run_dir.parents[2])     # <base_dir>/runs/<method>/<run id>
        started_ns = int(dt.datetime.fromisoformat(str(submitted)).timestamp()) * 1_000_000_000
    except (UsageError, ValueError, IndexError):
        spec, started_ns = None, 0                                            # the exit code alone decides
    return judge(spec, run_dir, status, started_ns, run_dir / records.LOG, dataset=record.get("dataset"))


# ---------------------------------------------------------------------- run.json


def _read(run_dir: Path) -> dict:
    return records.read_record(run_dir)     # never through a link


def _update(run_dir: Path, change: Callable[[dict], Any]) -> dict:
    """Read, change and write run.json under a lock the submitter, the steps and `runs cancel` share."""
    with open_lock(run_dir / ".run.json.lock") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        record = _read(run_dir)
        change(record)
        records.write_record(run_dir, record)
    return record


def _mark(run_dir: Path, status: str, reason: str | None, **fields) -> dict:
    def change(record: dict) -> None:
        if record.get("status") in TERMINAL:
            return
        record.update(status=status, ended=now(), **fields)
        if reason:
            record["reason"] = reason
        end_attempt(record, status)

    return _update(run_dir, change)


# ---------------------------------------------------------------------- doctor


def doctor_checks(base_dir: Path) -> list[tuple[str, str, bool]]:
    """Rows for `envmgr doctor`: does Slurm answer, does the base dir look shared. Informational only."""
    rows: list[tuple[str, str, bool]] = []
    if shutil.which("sinfo") is None:
        rows.append(("slurm", "no Slurm client on PATH (only needed for `--on slurm`)", True))
    else:
        try:
            rows.append(("slurm", f"answers; partitions: {', '.join(partitions()) or 'none'}", True))
        except SlurmError as exc:
            rows.append(("slurm", f"installed but {exc.message} (only needed for `--on slurm`)", True))
    kind = filesystem_type(base_dir)
    shared = kind in SHARED_FILESYSTEMS or kind.startswith("fuse.")
    rows.append(("base dir shared", f"{base_dir} is on {kind}: " + (
        "looks shared" if shared else "a local filesystem, so Slurm nodes other than this one will not see "
                                      "it (fine for a one-node cluster)"), True))
    return rows


def filesystem_type(path: Path) -> str:
    """The filesystem type of the mount holding `path` (from /proc/self/mounts: longest matching mount point)."""
    path = path.resolve() if path.exists() else path.absolute()
    best, kind = "", "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) < 3:
                continue
            point = parts[1].replace("\\040", " ")
            if (str(path) == point or str(path).startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
                best, kind = point, parts[2]
    return kind


# ---------------------------------------------------------------------- the target (envmgr/runs/targets.py)


class SlurmTarget:
    """The site's Slurm (envmgr/runs/slurm.py): sbatch, one node-local run per job step."""

    name = "slurm"
    hands_over = True

    def submit(self, ctx: Context, request: RunRequest, options: Mapping[str, Any]) -> dict:
        fields = {k: v for k, v in options.items() if k in SlurmRequest.__dataclass_fields__}
        return submit(ctx, request, SlurmRequest(**fields))

    def follow(self, ctx: Context, record: dict, timeout: float | None = None) -> dict:
        run_dir = ctx.config.base_dir / "runs" / record["method"] / record["run_id"]
        return follow(ctx, run_dir, str(record["scheduler"]["job_id"]), timeout)

    def refresh(self, runs: list[dict]) -> None:
        refresh(runs)

    def cancel(self, ctx: Context, record: dict) -> dict:
        return cancel(ctx, record)

    def alive(self, record: dict) -> bool:
        # Slurm still has the job (or does not answer): its steps own the record; else as a local run's
        return job_alive(record["scheduler"]) is not False or owner_alive(record)

    def doctor_checks(self, base_dir: Path) -> list[tuple[str, str, bool]]:
        return doctor_checks(base_dir)

    def where(self, record: dict) -> str:
        return f"slurm job {record['scheduler'].get('job_id')}"

    def handed_over(self, record: dict) -> tuple[str, dict[str, Any]]:
        job_id = record["scheduler"]["job_id"]
        return f"Slurm job {job_id}", {"job_id": job_id}
