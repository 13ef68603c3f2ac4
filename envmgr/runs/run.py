"""The local run target: the method in its image on this host's engine, with models and the dataset mounted
read-only from the base directory, a fresh run directory as its output, GPUs as Engine device requests, live
progress from the method's JSON lines, and a run record (`run.json`). A scheduler's job step (envmgr/runs/
slurm.py) runs here too, through `RunRequest.node`. What a run is before it starts is envmgr/runs/plan.py."""

from __future__ import annotations

import contextlib
import errno
import getpass
import os
import re
import signal
import socket
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from envmgr.build.build import BuildResult, build as build_image
from envmgr.build.sonames import runtime_hint
from envmgr.build.target import method_excludes
from envmgr.core import paths
from envmgr.core.errors import EngineError, EnvmgrError, Interrupted, UsageError
from envmgr.core.gpu import GpuRequest, parse_gpus
from envmgr.core.spec import MethodSpec
from envmgr.core.ui import TrainingProgress
from envmgr.door.containers import BindMount, ContainerSpec, gpu_devices
from envmgr.door.context import Context
from envmgr.door.engine import ENGINE_HINT, NVIDIA_HINT, EngineGone
from envmgr.images.base import ensure_base
from envmgr.runs import outputs as run_outputs, owned, records
from envmgr.runs.datasets import RunDataset
from envmgr.runs.gpu_plan import GpuPlan, preflight as gpu_preflight
from envmgr.runs.inputs import RunInput, copy_method
from envmgr.runs.method_files import RunFile, given_files, mounts_over_image, place_files
from envmgr.runs.plan import (
    NodeStep,
    RunData,
    RunRequest,
    content_hash,
    end_attempt,
    given,
    ids,
    inputs_record,
    method_command,
    method_dir,
    new_run_id,
    now,
    prepare_base_dir,
    progress_event,
    refusal_recorded,
    run_data,
    run_user,
)
from envmgr.runs.records import Status, check_run_id
from envmgr.runs.settle import owner_alive, owner_record, settle
from envmgr.runs.verdict import describe as describe_verdict, entry_hint, judge


@dataclass
class _Run:
    """One run as `run` assembles it: where it is, what it was asked and (on --resume, a job step) recorded."""

    request: RunRequest
    spec: MethodSpec
    run_id: str
    run_dir: Path
    previous: dict | None
    args: list[str]
    gpu_text: str | None
    as_root: bool

    @property
    def node(self) -> NodeStep | None:
        return self.request.node

    @property
    def record_file(self) -> str:
        return self.node.record_file if self.node else records.RECORD

    @property
    def log_file(self) -> str:
        return self.node.log_file if self.node else records.LOG

    @property
    def output(self) -> Path:
        return self.run_dir / records.OUTPUT

    @property
    def work(self) -> Path:
        return self.run_dir / (self.node.work_dir if self.node else records.WORK)

    @property
    def rank(self) -> int:
        return self.node.rank if self.node else 0


@dataclass
class _Given:
    """What the run mounts and passes besides its image: model, dataset, inputs, files, environment."""

    data: RunData
    inputs: list[RunInput]
    env: dict[str, str]
    files: list[RunFile]
    user: str
    prepared: RunDataset | None = None

    @property
    def model(self) -> Path | None:
        return self.data.model


def _begin(ctx: Context, request: RunRequest, base_dir: Path) -> _Run:
    """A new run's id and dir, or (--resume, a job step) the recorded run's, with its arguments, GPUs and user."""
    spec, node = request.method, request.node
    if not (request.resume or node):
        run_id = new_run_id()
        return _Run(request, spec, run_id, base_dir / "runs" / spec.name / run_id, None, list(request.args),
                    request.gpus, request.as_root)
    run_dir, previous = _node_record(base_dir, spec, node) if node else _resume(ctx, request, base_dir)
    recorded_args = previous.get("arguments")
    if not isinstance(recorded_args, list) or not all(isinstance(a, str) for a in recorded_args):
        raise UsageError(f"{run_dir / records.RECORD}: its arguments are not a list of strings")
    args = recorded_args + (["--resume"] if "--resume" not in recorded_args and not node else [])
    gpu_text = request.gpus if request.gpus is not None else previous.get("gpus")
    return _Run(request, spec, previous["run_id"], run_dir, previous, args,
                gpu_text if isinstance(gpu_text, str) else None, request.as_root or bool(previous.get("as_root")))


def _gpu_check(ctx: Context, r: _Run) -> tuple[GpuRequest, GpuPlan]:
    """The run's GPUs, probed in the engine, and the variant for this host's driver/GPUs (envmgr/runs/gpu_plan.py),
    before anything starts."""
    spec = r.spec
    gpus = resolve_gpus(ctx, spec, r.gpu_text)
    device_requests = gpu_devices(gpus)
    if device_requests and not ctx.engine.gpus_work(ensure_base(ctx, spec.base_image).image_id, device_requests):
        raise UsageError(f"{spec.name} asks for GPUs (--gpus {gpus}) but {NVIDIA_HINT}")
    recorded_variant = r.previous.get("variant") if r.previous else None
    return gpus, gpu_preflight(ctx, spec, gpus.env_value(),
                               r.request.variant or (recorded_variant if isinstance(recorded_variant, str) else None))


def _gather(ctx: Context, r: _Run, data: RunData) -> _Given:
    """--input, --env and --file (as given or recorded) beside the model and dataset, each readable by the user
    the method runs as."""
    inputs, user_env = given(r.request, r.previous, r.run_dir)
    files = given_files(r.request.files, r.previous, r.run_dir)
    found = _Given(data, inputs, user_env, files, run_user(ctx, r.as_root))
    _check_inputs_readable([("model", found.model), ("dataset", found.data.dataset)]
                           + [(f"input {i.name}", i.path) for i in inputs]
                           + ([] if r.spec.workdir == "method" else [(f"file {f.path}", f.source) for f in files]),
                           found.user)
    return found


def _prepare_run_dir(r: _Run, found: _Given) -> None:
    """output/ and the scratch work/ (never through a link), the method's copy and the dataset as it sees it."""
    r.run_dir.mkdir(parents=True, exist_ok=r.request.resume is not None or r.node is not None)
    with refusal_recorded(r.run_dir, r.previous, r.record_file):   # the method's own trees: never through a link
        for folder in (r.output, r.work):
            owned.ensure_folder(r.run_dir, folder.name, ids(found.user))
        if r.spec.workdir == "method":
            place_files(found.files, copy_method(r.spec, r.work, found.user, method_excludes(r.spec)), found.user)
        found.prepared = found.data.prepare(r.spec, r.run_dir, found.user)


def _mounts(r: _Run, found: _Given) -> list[BindMount]:
    """Only output/ and the scratch work/ are writable by the method; run.json and log.txt are not mounted."""
    model, prepared = found.model, found.prepared
    mounts = [BindMount(r.work, paths.CONTAINER_RUN, read_only=False),
              BindMount(r.output, f"{paths.CONTAINER_RUN}/output", read_only=False)]
    if model:
        mounts.append(BindMount(model, f"{paths.CONTAINER_MODELS}/{model.name}", read_only=True))
    if prepared:
        mounts.append(BindMount(prepared.path, prepared.target, read_only=prepared.read_only))
    mounts += [BindMount(i.path, i.target, read_only=True) for i in found.inputs]
    if r.spec.workdir != "method":    # no per-run copy: each --file over the image's method folder
        mounts += [BindMount(source, target, read_only=True) for source, target in mounts_over_image(found.files)]
    return mounts


def _command(r: _Run, found: _Given) -> list[str]:
    """The entry, the platform's arguments the run's own do not name (for specs that take them), the run's."""
    platform_args = [f"--train_id={r.run_id}", f"--output_dir={paths.CONTAINER_RUN}/output"]
    if found.model:
        platform_args.insert(0, f"--model_path={paths.CONTAINER_MODELS}/{found.model.name}")
    if found.prepared:
        platform_args.insert(1, f"--pic_relative_path={found.prepared.target}")
    named = {a.split("=", 1)[0] for a in r.args}
    return method_command(r.spec) + ([a for a in platform_args if a.split("=", 1)[0] not in named]
                                     if r.spec.platform_args else []) + r.args


def _container_env(r: _Run, found: _Given, gpus: GpuRequest, gpu_plan: GpuPlan) -> dict[str, str]:
    env = {"HOME": "/tmp", "HF_HUB_OFFLINE": "1", "ENVMGR_OUTPUT_DIR": f"{paths.CONTAINER_RUN}/output",
           "ENVMGR_RUN_ID": r.run_id, "MPLCONFIGDIR": "/tmp/matplotlib"}
    if found.model:
        env["ENVMGR_MODEL_PATH"] = f"{paths.CONTAINER_MODELS}/{found.model.name}"
    if found.prepared:
        env["ENVMGR_DATASET_PATH"] = found.prepared.target
    count = gpus.process_count(None)
    if gpus.wants_gpus:
        env["TRAINING_NUM_PROCESSES"] = str(count) if count else "auto"
    env.update(gpu_plan.env())   # ENVMGR_GPUS, and one process per GPU when the host's GPUs are known
    if not gpus.wants_gpus:
        env["NVIDIA_VISIBLE_DEVICES"] = "void"
        env["CUDA_VISIBLE_DEVICES"] = ""
    if found.inputs:
        env["ENVMGR_INPUTS_DIR"] = paths.CONTAINER_INPUTS
    env.update(found.env)   # names envmgr sets are refused in run_inputs.parse_env
    if r.node:
        env.update(r.node.env)
    return env


def _running_record(ctx: Context, r: _Run, found: _Given, result: BuildResult, container: ContainerSpec,
                    gpus: GpuRequest, gpu_plan: GpuPlan, limits: Limits, handover: run_outputs.Handover) -> dict:
    """run.json as the container starts: what runs, on what, as whom; a new attempt (or the one a job opened)."""
    record = r.previous or {}
    record.update({
        "layout": records.LAYOUT,
        "run_id": r.run_id, "method": r.spec.name, "image": {"id": result.image_id, "tag": result.tag},
        "lock_hash": result.lock_hash, "inputs_hash": result.inputs_hash,
        **found.data.record(found.prepared, r.run_dir, ctx.cache_dir),
        "inputs": inputs_record(found.inputs, ctx.cache_dir),
        "files": [{"source": str(f.source), "path": f.path, "hash": content_hash(f.source, ctx.cache_dir)}
                  for f in found.files],
        "env": found.env,
        "arguments": r.args, "command": container.command, "gpus": gpus.env_value(),
        "network": r.request.network, "host": socket.gethostname(), "user": getpass.getuser(),
        "run_as": found.user, "as_root": found.user == "0:0",
        "status": Status.RUNNING, "exit_code": None, "reason": None, "missing_outputs": None, "verdict": None,
        "container": container.name, "envmgr": owner_record(),
        "gpu": gpu_plan.record(), "variant": r.spec.variant, "outputs_for": handover.recorded(),
        "limits": limits.record(),
    })
    attempts = record.setdefault("attempts", [])
    if r.node and attempts:    # the attempt the submission opened for this job
        attempts[-1].update(started=attempts[-1].get("started") or now(), ended=None, status=Status.RUNNING)
    else:
        attempts.append({"started": now(), "ended": None, "status": Status.RUNNING})
    record["started"] = record.get("started") or now()
    return record


def run(ctx: Context, request: RunRequest) -> dict:
    base_dir = ctx.config.base_dir
    prepare_base_dir(base_dir)
    limits = Limits.of(ctx, request)
    r = _begin(ctx, request, base_dir)
    data = run_data(base_dir, request, r.previous)   # model and dataset (as given or recorded) first
    gpus, gpu_plan = _gpu_check(ctx, r)
    r.spec = spec = gpu_plan.spec
    found = _gather(ctx, r, data)
    result = build_image(ctx, spec)
    gpu_plan.confirm(ctx, result.image_id)   # GPU architectures of the built image vs the host's GPUs
    _prepare_run_dir(r, found)
    mounts = _mounts(r, found)
    with refusal_recorded(r.run_dir, r.previous, r.record_file):
        _check_owned_mounts(mounts, r.run_dir)
    container = ContainerSpec(
        image=result.image_id, command=_command(r, found), env=_container_env(r, found, gpus, gpu_plan),
        mounts=mounts, workdir=paths.CONTAINER_RUN if spec.workdir == "run" else method_dir(spec),
        user=found.user, network=request.network, shm_size=limits.shm,
        name=f"envmgr-run-{spec.name}-{r.run_id}" + (f"-rank{r.rank}" if r.rank else ""),
        device_requests=gpu_devices(gpus), labels={paths.LABEL_METHOD: spec.name, paths.LABEL_KIND: "run",
                                                   paths.LABEL_PREFIX + "run-id": r.run_id},
        stop_timeout=120,
    ).hardened(pids_limit=ctx.config.run.pids_limit, mem_limit=limits.memory, tmp_size=limits.tmp)
    handover = run_outputs.Handover.for_invoker()
    record = _running_record(ctx, r, found, result, container, gpus, gpu_plan, limits, handover)
    records.open_log(r.run_dir, r.log_file).close()  # a link planted over log.txt stops the run before it starts
    records.save(r.run_dir, record, r.record_file, "before the container started")
    with refusal_recorded(r.run_dir, record, r.record_file):
        _check_owned_mounts(mounts, r.run_dir)    # again, as late as can be: nothing runs between this and the engine
    reserve = _reserve_space(r.run_dir, r.rank)
    ctx.ui.step(f"run {r.run_id}: {spec.name} in {result.tag} (gpus {gpus}, network {request.network}, "
                f"as {'root' if found.user == '0:0' else found.user})", run_id=r.run_id, run_dir=str(r.run_dir))
    started_ns, log_start = time.time_ns(), (r.run_dir / r.log_file).lstat().st_size   # this attempt's log follows
    ended = _follow(ctx, container, r.run_dir, r.log_file, r.node.on_start if r.node else None)
    outputs = run_outputs.inspect_noted(ctx, r.run_dir, handover, r.log_file)
    disk_full = _record_end(r, record, ended, outputs, started_ns, log_start)
    reserve.unlink(missing_ok=True)   # the room kept for this record, should the method have filled the disk
    records.save(r.run_dir, record, r.record_file, f"after it {record['status']}")
    _raise_unless_succeeded(ctx, r, record, ended, disk_full)
    return record


def _record_end(r: _Run, record: dict, ended: _Ended, outputs: run_outputs.Outputs, started_ns: int,
                log_start: int) -> dict | None:
    """How the run ended, in its record: an exit 0 judged by what it wrote and how its log ends (a launcher that
    hides a crash; rank 0 judges a run), the engine gone, a full disk."""
    status = ended.status
    verdict = judge(r.spec, r.run_dir, ended.code, started_ns, r.run_dir / r.log_file, log_start,
                    record.get("dataset"), outputs=not r.rank) if status in (Status.SUCCEEDED, Status.FAILED) else None
    if verdict:
        status = verdict.status
        record.update(verdict.fields())
    missing = bool(verdict and verdict.reason)   # an exit 0 turned failed: its rule says why, not the disk
    disk_full = (_disk_full(r.output, ended) if status == Status.FAILED and not missing and ended.engine_gone is None
                 else None)
    if ended.engine_gone is not None:   # its container may still be in the engine: settled once it is back
        record.update(reason=f"engine unreachable: {ended.engine_gone.message}", container_left=True)
    elif disk_full:
        record.update(reason="disk full", disk_full=disk_full)
    record.update(status=status, exit_code=ended.code, ended=now(), artifacts=outputs.artifacts(),
                  refused_outputs=outputs.refused, changed_outputs=outputs.changed, oom_killed=ended.oom_killed)
    end_attempt(record, status)
    return disk_full


def _raise_unless_succeeded(ctx: Context, r: _Run, record: dict, ended: _Ended, disk_full: dict | None) -> None:
    """The run's end said as envmgr's error (after its record is written): engine gone, disk full, interrupted,
    failed."""
    run_id, name = r.run_id, r.spec.name
    if ended.engine_gone is not None:
        raise EngineError(f"run {run_id} failed: {ended.engine_gone.message} (recorded in "
                          f"{r.run_dir / r.record_file}; `envmgr runs` removes its container once the engine is back)",
                          hint=ENGINE_HINT)
    if disk_full:
        raise EnvmgrError(f"run {run_id} failed (disk full): no space left on {disk_full['filesystem']} "
                          f"({disk_full['free_bytes'] // 1024} KiB free now); log: {r.run_dir / r.log_file}",
                          hint=f"free space there, then `envmgr run {name} --resume {run_id}` "
                               "continues from the last complete checkpoint")
    if record["status"] == Status.INTERRUPTED:
        _ignore_further_interrupts()   # the record is written; only the report and the exit are left
        raise Interrupted(f"run {run_id} interrupted: checkpoints kept in {r.output}",
                          hint=f"continue with `envmgr run {name} --resume {run_id}`")
    if record["status"] == Status.FAILED:
        raise _failure(run_id, r.run_dir, record, ended.tail, ctx.cache_dir, r.spec)


def _failure(run_id: str, run_dir: Path, record: dict, tail: list[str], cache_dir: Path | None = None,
             spec: MethodSpec | None = None) -> EnvmgrError:
    verdict: dict = record["verdict"] if isinstance(record.get("verdict"), dict) else {}
    if record.get("exit_code") == 0 and record.get("reason"):   # an exit 0 that a rule of verdict.py turned failed
        why = record["reason"]
        detail = f"  {describe_verdict(record)}\n"
    else:
        why = ("the container was killed for lack of memory (OOM)" if record.get("oom_killed")
               else f"exit {record.get('exit_code')}")
        detail = ""
    last = "\n".join(f"    {line}" for line in tail)
    return EnvmgrError(f"run {run_id} failed ({why}); log: {run_dir / records.LOG}\n{detail}  last lines:\n{last}",
                       hint=verdict.get("hint") or ("the spec's `success` names what a run must write"
                                                    if record.get("reason") == "no outputs" else None)
                       or (runtime_hint(tail, cache_dir) if cache_dir else None)
                       or (entry_hint(tail, spec.entry, spec.source_path) if spec else None))


def resolve_gpus(ctx: Context, spec: MethodSpec, given: str | None) -> GpuRequest:
    if given is not None:
        request = parse_gpus(given)
        if spec.gpu == "none" and request.wants_gpus:
            raise UsageError(f"{spec.name} declares gpu = \"none\"; it cannot use --gpus {given}")
        return request
    if spec.gpu == "required" or (spec.gpu == "optional" and ctx.engine.has_nvidia_runtime()):
        return parse_gpus("all")
    return parse_gpus("none")



def _unreadable(path: Path, user: str) -> Path | None:
    """The first file or folder under `path` that `user` (uid:gid) could not read in the container."""
    uid, gid = ids(user)
    if uid == 0:
        return None

    def readable(item: Path) -> bool:
        st = item.stat()
        need = 0o5 if item.is_dir() else 0o4
        shift = 6 if st.st_uid == uid else 3 if st.st_gid == gid else 0
        bits = (st.st_mode >> shift) & 7
        return bits & need == need

    items = [path, *sorted(path.rglob("*"))] if path.is_dir() else [path]
    return next((item for item in items if not readable(item)), None)


def _check_inputs_readable(inputs: list[tuple[str, Path | None]], user: str) -> None:
    for what, path in inputs:
        if path is None:
            continue
        blocked = _unreadable(path, user)
        if blocked is not None:
            st = blocked.stat()
            raise UsageError(f"the {what} is not readable by the user the method runs as ({user}): {blocked} "
                             f"(mode {stat.filemode(st.st_mode)}, owner {st.st_uid}:{st.st_gid})",
                             hint=f"make it readable (`chmod -R a+rX {path}`), set [run] run_as to a user that "
                                  "can read it, or run with --as-root")



def _resume(ctx: Context, request: RunRequest, base_dir: Path) -> tuple[Path, dict]:
    spec = request.method
    run_id = check_run_id(request.resume or "")
    run_dir = base_dir / "runs" / spec.name / run_id
    if run_dir.is_symlink() or not (run_dir / records.RECORD).is_file():
        raise UsageError(f"no run {run_id!r} of {spec.name} under {run_dir.parent}", hint="`envmgr runs` lists them")
    previous = records.read_record(run_dir)
    if previous.get("method") != spec.name or previous.get("run_id") != run_id:
        raise UsageError(f"{run_dir / records.RECORD} does not describe run {run_id} of {spec.name}")
    on = records.target_name(previous)
    if on != records.LOCAL:   # before settling: whether its job lives is its target's to say (envmgr/runs/ledger.py)
        where = "Slurm" if on == "slurm" else on
        raise UsageError(f"run {run_id} runs on {where}; a local --resume would leave its record half {where}'s",
                         hint=f"`envmgr run {spec.name} --resume {run_id} --on {on}`")
    previous = settle(ctx, run_dir, previous)
    if previous["status"] == Status.RUNNING:
        raise UsageError(f"run {run_id} is still running (envmgr pid {previous.get('envmgr', {}).get('pid')})",
                         hint="wait for it, or stop it with Ctrl-C first")
    return run_dir, previous


def _node_record(base_dir: Path, spec: MethodSpec, node: NodeStep) -> tuple[Path, dict]:
    """A job step's run dir and the record its submission wrote: the same checks as --resume."""
    run_id = check_run_id(node.run_id)
    run_dir = base_dir / "runs" / spec.name / run_id
    if run_dir.is_symlink() or node.run_dir.absolute() != run_dir.absolute():
        raise UsageError(f"{node.run_dir} is not run {run_id} of {spec.name} under {run_dir.parent}")
    previous = records.read_record(run_dir)
    if previous.get("method") != spec.name or previous.get("run_id") != run_id:
        raise UsageError(f"{run_dir / records.RECORD} does not describe run {run_id} of {spec.name}")
    if node.rank == 0 and previous["status"] not in records.ACTIVE:   # e.g. cancelled while pending
        raise UsageError(f"run {run_id} is {previous['status']}, not waiting for its job steps")
    return run_dir, previous



def _check_owned_mounts(mounts: list[BindMount], run_dir: Path) -> None:
    """Every mount source as the engine will follow it: in the run's own trees, a folder reached without a link
    at any level (owned.mount_source); anything else still the resolved path it was when it was chosen."""
    real_run = os.path.realpath(run_dir)
    for mount in mounts:
        source = str(mount.source)
        inside = next((source[len(base):].lstrip("/") for base in (str(run_dir), real_run)
                       if source.startswith(base + "/")), None)
        if inside is not None:
            mount.source = owned.mount_source(run_dir, inside)
        elif os.path.realpath(source) != os.path.normpath(source):
            raise owned.Refused(f"{source} is reached through a symbolic link now (it was a resolved path when it "
                                f"was chosen); envmgr will not mount it at {mount.target}",
                                hint="name it again (e.g. `--input PATH:NAME` with --resume)")



def artifacts(output: Path) -> dict[str, list[str]]:
    """The run's artifacts under `output` (its run dir's output/): folders and files only, no link followed."""
    return run_outputs.artifacts(output.parent)



class _SecondInterrupt:
    """After the first Ctrl-C the container is being stopped (the method saves a checkpoint): a second
    one only says so, so the run record is always written."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.previous: dict[int, Any] = {}
        self.interrupted = False

    def __enter__(self) -> "_SecondInterrupt":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._first)
        return self

    def _first(self, signum: int, frame: Any) -> None:  # noqa: ARG002 - signal handler signature
        self.interrupted = True
        for sig in self.previous:
            signal.signal(sig, self._again)
        raise KeyboardInterrupt

    def _again(self, signum: int, frame: Any) -> None:  # noqa: ARG002 - signal handler signature
        self.ctx.ui.warn("still stopping the container (the method is saving its checkpoint); "
                         "the run record is written when it has stopped")

    def __exit__(self, *exc: Any) -> None:
        if self.interrupted:
            return   # stay shielded: the record is written and the interruption reported after this block
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _ignore_further_interrupts() -> None:
    """Python restores the default action of a signal it handled while it exits, so a late Ctrl-C would
    kill the process mid-exit (status -2 instead of 130); an ignored signal stays ignored."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)


@dataclass
class _Ended:
    """How a followed run ended, as envmgr saw it."""

    status: Status = Status.FAILED
    code: int | None = None
    tail: list[str] = field(default_factory=list)
    oom_killed: bool = False
    engine_gone: EngineGone | None = None   # the engine stopped answering: its container may be left there
    log_error: OSError | None = None        # log.txt could not be written (a full disk): the tail is kept
    no_space_line: str | None = None        # the method's first line that says ENOSPC


RESERVE_BYTES = 256 << 10   # run.json and log.txt's last lines, after a method filled the disk


def _reserve_space(run_dir: Path, rank: int) -> Path:
    """Space held for the final record while the method runs (the disk it writes to is usually the run dir's)."""
    reserve = run_dir / f".envmgr-reserve-{rank}"
    try:
        fd = os.open(reserve, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            os.posix_fallocate(fd, 0, RESERVE_BYTES)
        finally:
            os.close(fd)
    except OSError:
        reserve.unlink(missing_ok=True)   # already short of space, or no fallocate here: run without it
    return reserve


def _disk_full(output: Path, ended: _Ended) -> dict | None:
    """Where a failed run ran out of space: the method said ENOSPC, or envmgr could not write its log."""
    if ended.no_space_line is None and not (ended.log_error and ended.log_error.errno == errno.ENOSPC):
        return None
    mount = output.resolve()
    while mount.parent != mount and mount.parent.stat().st_dev == mount.stat().st_dev:
        mount = mount.parent
    fs = os.statvfs(output)
    return {"filesystem": str(mount), "free_bytes": fs.f_bavail * fs.f_frsize, "said": ended.no_space_line,
            "log_error": ended.log_error.strerror if ended.log_error else None}


def _follow(ctx: Context, container: ContainerSpec, run_dir: Path, log_file: str = records.LOG,
            on_start: Callable[[str], None] | None = None) -> _Ended:
    tail: deque[str] = deque(maxlen=12)
    log = records.open_log(run_dir, log_file)
    display = TrainingProgress(ctx.ui)
    started = time.monotonic()
    ended = _Ended()

    def write_log(text: str) -> None:
        if ended.log_error is None:
            try:
                log.write(text)
                log.flush()
            except OSError as exc:   # a full disk under the run dir: keep following, keep the tail
                ended.log_error = exc
                ctx.ui.warn(f"cannot write {run_dir / log_file} ({exc.strerror}); the run goes on")

    def on_line(line: str) -> None:
        line = ctx.ui.redact(line)
        write_log(line + "\n")
        if ended.no_space_line is None and os.strerror(errno.ENOSPC) in line:
            ended.no_space_line = line.strip()[:300]
        tail.append(line)
        event = progress_event(line)
        if event is None:
            ctx.ui.log(line)
            display.line(line)
            return
        ctx.ui.event("method." + str(event.get("event")), **{k: v for k, v in event.items() if k != "event"})
        if event.get("event") == "progress":
            display.update(event)

    with _SecondInterrupt(ctx):
        try:
            result = ctx.engine.run(container, on_line=on_line, on_start=on_start, on_partial=display.line)
            ended.code, ended.oom_killed = result.exit_code, result.oom_killed
            ended.status = Status.SUCCEEDED if ended.code == 0 else Status.FAILED
        except (Interrupted, KeyboardInterrupt):
            ended.status = Status.INTERRUPTED
        except EngineGone as exc:   # the engine went away mid-run: record it, then report it
            ended.engine_gone = exc
            tail.append(f"envmgr: {exc.message}")
            write_log(f"# envmgr: {exc.message}\n")
        except EnvmgrError as exc:
            tail.append(f"envmgr: {exc.message}")
        finally:
            display.close()
            write_log(f"# envmgr: container ended after {time.monotonic() - started:.1f} s\n")
            with contextlib.suppress(OSError):
                log.close()
    if ended.code == 130:
        ended.status = Status.INTERRUPTED
    ended.tail = list(tail)
    return ended


def parse_size(text: str, flag: str) -> str:
    """`8g`, `512m`, `1024` (bytes) -> the same text, checked; anything else is a usage error."""
    if not re.fullmatch(r"[1-9][0-9]*[bkmg]?", text.strip().lower()):
        raise UsageError(f"{flag} {text!r}: expected a size such as 512m or 8g")
    return text.strip().lower()


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def size_bytes(text: str) -> int:
    """A size parse_size accepted, in bytes."""
    return int(text.rstrip("bkmg")) * _UNITS[text[-1] if text[-1] in "bkmg" else ""]


def _host_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 8 << 30


def _mib(size: int) -> str:
    return f"{max(1, size >> 20)}m"


@dataclass(frozen=True)
class Limits:
    """How much memory a run container may use, and how large its tmpfs /tmp and its /dev/shm may grow: the
    flag, else the site's `[run]` setting, else the spec's `[limits]` (memory at most the host's default, a
    tmpfs at most the memory limit), else a
    default that follows the host: memory 7/8 of the host's RAM, /dev/shm a quarter of the host's RAM (at most
    16 GiB), /tmp a quarter of the memory limit (at most 8 GiB); neither tmpfs larger than the memory limit
    (their pages count against it)."""

    memory: str
    shm: str
    tmp: str

    @classmethod
    def of(cls, ctx: Context, request: RunRequest) -> Limits:
        site, spec = ctx.config.run, request.method.limits
        host = _host_memory()

        def pick(flag: str | None, configured: str | None, wanted: str | None, name: str, default: int,
                 ceiling: int) -> str:
            if flag or configured:
                return parse_size(str(flag or configured), f"--{name.replace('_', '-')}" if flag else f"[run] {name}")
            if wanted:
                return _mib(min(size_bytes(parse_size(wanted, f"the spec's [limits] {name}")), ceiling))
            return _mib(default)

        most = host // 8 * 7
        memory = pick(request.memory, site.memory, spec.memory, "memory", most, most)
        cap = size_bytes(memory)
        shm = pick(request.shm_size, site.shm_size, spec.shm_size, "shm_size", min(16 << 30, host // 4, cap), cap)
        tmp = pick(None, site.tmp_size, spec.tmp_size, "tmp_size", min(8 << 30, cap // 4), cap)
        return cls(memory, shm, tmp)

    def record(self) -> dict[str, str]:
        return {"memory": self.memory, "shm": self.shm, "tmp": self.tmp}


class LocalTarget:
    """This host's engine: `envmgr run` runs the container and follows it to its end (envmgr/runs/run.py)."""

    name = records.LOCAL
    hands_over = False

    def submit(self, ctx: Context, request: RunRequest, options: Mapping[str, Any]) -> dict:
        if options.get("sign") is not None:
            raise UsageError("--sign is for --on slurm (it signs the archive the nodes import)")
        return run(ctx, request)

    def follow(self, ctx: Context, record: dict, timeout: float | None = None) -> dict:
        return record     # the envmgr that ran it followed it (its record is its verdict)

    def refresh(self, runs: list[dict]) -> None:
        return None       # the record is the truth; a dead envmgr's run is settled when it is read

    def cancel(self, ctx: Context, record: dict) -> dict:
        raise UsageError(f"run {record['run_id']} is a local run: stop it with Ctrl-C (or SIGTERM) where it runs")

    def alive(self, record: dict) -> bool:
        return owner_alive(record)

    def doctor_checks(self, base_dir: Path) -> list[tuple[str, str, bool]]:
        return []         # the engine and the GPU runtime are doctor's own first rows

    def where(self, record: dict) -> str:
        return "local"

    def handed_over(self, record: dict) -> tuple[str, dict[str, Any]]:
        return "this host's engine", {}
