"""`envmgr run`: the method in its image, with models and the dataset mounted read-only from the
base directory, a fresh run directory as its output, GPUs as Engine device requests, live
progress from the method's JSON lines, and a run record (`run.json`)."""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import getpass
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import owned, paths, records, run_outputs
from .backends import entry_command
from .base import ensure_base
from .build import _excluded, build as build_image
from .containers import BindMount, ContainerSpec, gpu_devices
from .context import Context
from .engine import ENGINE_HINT, NVIDIA_HINT, EngineGone
from .errors import EngineError, EnvmgrError, Interrupted, UsageError
from .files import atomic_write
from .gpu import GpuRequest, parse_gpus
from .gpu_plan import preflight as gpu_preflight
from .image import file_sha256
from .records import check_run_id, write_record
from .run_datasets import RunDataset, prepare_dataset, record as dataset_record
from .run_files import given_files, mounts_over_image, place_files
from .run_inputs import RunInput, copy_method, parse_env, parse_inputs, recorded_env, recorded_inputs
from .sonames import runtime_hint
from .spec import MethodSpec, find_method
from .ui import TrainingProgress
from .verdict import Verdict, describe as describe_verdict, entry_hint, judge

SUBDIRS = ("models", "datasets", "methods", "runs", "cache")


@dataclass
class RunRequest:
    method: MethodSpec
    model: str | None = None
    dataset: str | None = None
    gpus: str | None = None
    network: str = "none"
    args: list[str] = field(default_factory=list)
    resume: str | None = None
    shm_size: str | None = None
    memory: str | None = None
    as_root: bool = False
    variant: str | None = None     # None: the newest variant this host's GPUs can use (envmgr/gpu_plan.py)
    inputs: list[str] = field(default_factory=list)   # `--input PATH[:NAME]`
    env: list[str] = field(default_factory=list)      # `--env K=V`
    files: list[str] = field(default_factory=list)    # `--file SRC:REL` (envmgr/run_files.py)
    node: NodeStep | None = None   # set only by a scheduler's job step (envmgr/slurm.py)


@dataclass
class NodeStep:
    """A job step of a run a scheduler started (envmgr/slurm.py): the run dir and its record exist already
    (the inputs come from it, validated as on --resume), and several machines of one run may share the run
    dir: rank 0 owns run.json, log.txt and work/; every other rank has run-rank<N>.json, log-rank<N>.txt and
    its own scratch work-rank<N>/ (two ranks on one node never share a work dir)."""

    run_id: str
    run_dir: Path
    rank: int = 0
    env: dict[str, str] = field(default_factory=dict)       # rank / machine / rendezvous variables
    on_start: Callable[[str], None] | None = None

    def _suffix(self, name: str, ext: str = "") -> str:
        return f"{name}{ext}" if self.rank == 0 else f"{name}-rank{self.rank}{ext}"

    @property
    def record_file(self) -> str:
        return self._suffix("run", ".json")

    @property
    def log_file(self) -> str:
        return self._suffix("log", ".txt")

    @property
    def work_dir(self) -> str:
        return self._suffix(records.WORK)


def prepare_base_dir(base_dir: Path) -> None:
    try:
        for sub in SUBDIRS:
            (base_dir / sub).mkdir(parents=True, exist_ok=True)
        probe = base_dir / "runs" / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"base dir {base_dir} is not writable ({exc.strerror})",
                         hint="choose another with --base-dir or ENVMGR_BASE_DIR") from None


def resolve_model(base_dir: Path, name: str | None, spec: MethodSpec) -> Path | None:
    name = name or spec.default_model
    if not name:
        return None
    candidate = Path(name).expanduser()
    path = candidate if candidate.is_absolute() else base_dir / "models" / name
    if not path.is_dir():
        models = base_dir / "models"
        present = sorted(p.name for p in models.iterdir() if p.is_dir()) if models.is_dir() else []
        raise UsageError(f"model {name!r} not found at {path} (models/ holds: {', '.join(present) or 'nothing'})",
                         hint="put a diffusers model folder there, or pass --model NAME or an absolute path")
    return path.resolve()


def resolve_dataset(base_dir: Path, name: str | None) -> Path | None:
    if not name:
        return None
    candidate = Path(name).expanduser()
    for path in ([candidate] if candidate.is_absolute() else [base_dir / "datasets" / name, candidate]):
        if path.exists():
            return path.resolve()
    present = sorted(p.name for p in (base_dir / "datasets").iterdir()) if (base_dir / "datasets").is_dir() else []
    raise UsageError(f"dataset {name!r} not found under {base_dir / 'datasets'} "
                     f"(holds: {', '.join(present) or 'nothing'})")


def content_hash(path: Path, cache_dir: Path | None = None) -> str:
    """sha256 over relative paths and bytes (a file, or a folder's files in sorted order).

    A base model is many gigabytes: the hash is remembered in `cache_dir/content-hashes.json`,
    keyed by the path and every file's size, mtime and inode, so a repeat run only stats files.
    """
    root = path if path.is_dir() else path.parent
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    stamp = hashlib.sha256()
    for file in files:
        st = file.stat()
        stamp.update(f"{file.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\n".encode())
    memo_file = cache_dir / "content-hashes.json" if cache_dir else None
    memo: dict = {}
    if memo_file and memo_file.is_file():
        try:
            memo = json.loads(memo_file.read_text())
        except (OSError, json.JSONDecodeError):
            memo = {}
    known = memo.get(str(path))
    if known and known.get("stamp") == stamp.hexdigest() and known.get("v") == 2:
        return known["hash"]
    sha = hashlib.sha256()
    for file in files:
        sha.update(f"{file.relative_to(root)}\0{file_sha256(file)[0]}\n".encode())
    digest = "sha256:" + sha.hexdigest()
    if memo_file:
        memo[str(path)] = {"stamp": stamp.hexdigest(), "hash": digest, "v": 2}
        atomic_write(memo_file, json.dumps(memo))
    return digest


def new_run_id() -> str:
    return dt.datetime.now().strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def artifacts(output: Path) -> dict[str, list[str]]:
    """The run's artifacts under `output` (its run dir's output/): folders and files only, no link followed."""
    return run_outputs.artifacts(output.parent)


def _method_dir(spec: MethodSpec) -> str:
    """Where the method's files are in its container: the run's writable copy for workdir = "method"."""
    return paths.CONTAINER_RUN_METHOD if spec.workdir == "method" else paths.CONTAINER_METHOD_DIR


def _entry_command(spec: MethodSpec) -> list[str]:
    """The spec's entry with its method files made absolute (the container's cwd is the run dir)."""
    command = []
    for word in spec.entry:
        if not word.startswith("-") and (spec.source_path / word).is_file():
            word = f"{_method_dir(spec)}/{word}"
        command.append(word)
    return entry_command(spec, command)   # e.g. through `conda run -n <m>` for a conda env


def _run_user(ctx: Context, as_root: bool) -> str:
    """Who the method runs as: the invoking user; for root, the sudo caller or the site's `run_as`."""
    if os.getuid() != 0:
        return f"{os.getuid()}:{os.getgid()}"
    if as_root:
        return "0:0"
    if os.environ.get("SUDO_UID", "").isdigit() and os.environ["SUDO_UID"] != "0":
        return f"{os.environ['SUDO_UID']}:{os.environ.get('SUDO_GID', os.environ['SUDO_UID'])}"
    return ctx.config.run.run_as


def _ids(user: str) -> tuple[int, int]:
    uid, gid = (int(x) for x in user.split(":"))
    return uid, gid


def _unreadable(path: Path, user: str) -> Path | None:
    """The first file or folder under `path` that `user` (uid:gid) could not read in the container."""
    uid, gid = (int(x) for x in user.split(":"))
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


def _inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def _recorded_input(base_dir: Path, record: dict, key: str, folder: str) -> Path | None:
    """A model or dataset path from envmgr's record, accepted only inside the base dir's folder for it."""
    entry = record.get(key)
    if not entry:
        return None
    raw = entry.get("path") if isinstance(entry, dict) else None
    root = (base_dir / folder).resolve()
    if not isinstance(raw, str) or not Path(raw).is_absolute() or not _inside(Path(raw).resolve(), root):
        raise UsageError(f"the run record's {key} ({raw!r}) is not under {root}; envmgr will not mount it on resume",
                         hint=f"name it again: `--{key} PATH` with --resume")
    path = Path(raw).resolve()
    if not path.exists():
        raise UsageError(f"the {key} this run used is gone: {path}", hint=f"name another with `--{key}` and --resume")
    return path


@dataclass(frozen=True)
class RunData:
    """A run's model and dataset on this host: as given, or (--resume, a scheduler's job step) as its record
    says. A local run and a Slurm submission (envmgr/slurm.py) resolve, prepare and record them here."""

    model: Path | None
    dataset: Path | None
    recorded_mode: str | None = None     # the record's dataset_mode, kept while the dataset is not named again

    def prepare(self, spec: MethodSpec, run_dir: Path, user: str) -> RunDataset | None:
        """The dataset as the run sees it (run_datasets.py): extracted or copied into the run dir once. The
        writable copy lives in rank 0's work/, so a scheduler's job steps all find the one its submission made."""
        if self.dataset is None:
            return None
        work = owned.ensure_folder(run_dir, records.WORK, _ids(user))   # a link there is refused
        return prepare_dataset(spec, self.dataset, run_dir, work, user, self.recorded_mode)

    def record(self, prepared: RunDataset | None, run_dir: Path, cache_dir: Path) -> dict:
        """run.json's `model` and `dataset`: name, path and content hash; the dataset's mode and copy."""
        model, dataset = self.model, self.dataset
        return {
            "model": {"name": model.name, "path": str(model), "hash": content_hash(model, cache_dir)}
            if model else None,
            "dataset": {"name": dataset.name, "path": str(dataset), "hash": content_hash(dataset, cache_dir),
                        **dataset_record(prepared, run_dir)}
            if dataset and prepared else None,
        }


def run_data(base_dir: Path, request: RunRequest, previous: dict | None) -> RunData:
    """The model and dataset a run uses: `--model`/`--dataset` when given (or for a new run), else the
    record's, accepted only inside the base dir's folders."""
    spec = request.method
    model = (resolve_model(base_dir, request.model, spec) if request.model or previous is None
             else _recorded_input(base_dir, previous, "model", "models"))
    dataset = (resolve_dataset(base_dir, request.dataset) if request.dataset or previous is None
               else _recorded_input(base_dir, previous, "dataset", "datasets"))
    mode = ((previous or {}).get("dataset") or {}).get("mode") if request.dataset is None else None
    return RunData(model, dataset, mode if isinstance(mode, str) else None)


def _resume(ctx: Context, request: RunRequest, base_dir: Path) -> tuple[Path, dict]:
    spec = request.method
    run_id = check_run_id(request.resume or "")
    run_dir = base_dir / "runs" / spec.name / run_id
    if run_dir.is_symlink() or not (run_dir / records.RECORD).is_file():
        raise UsageError(f"no run {run_id!r} of {spec.name} under {run_dir.parent}", hint="`envmgr runs` lists them")
    previous = settle(ctx, run_dir, records.read_record(run_dir))
    if previous.get("method") != spec.name or previous.get("run_id") != run_id:
        raise UsageError(f"{run_dir / records.RECORD} does not describe run {run_id} of {spec.name}")
    if isinstance(previous.get("scheduler"), dict) and previous["scheduler"].get("kind") == "slurm":
        raise UsageError(f"run {run_id} runs on Slurm; a local --resume would leave its record half Slurm's",
                         hint=f"`envmgr run {spec.name} --resume {run_id} --on slurm`")
    if previous["status"] == "running":
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
    if node.rank == 0 and previous["status"] not in ("pending", "running"):   # e.g. cancelled while pending
        raise UsageError(f"run {run_id} is {previous['status']}, not waiting for its job steps")
    return run_dir, previous


@contextlib.contextmanager
def _refusal_recorded(run_dir: Path, record: dict | None, record_file: str) -> Iterator[None]:
    """A run dir the method changed into links (owned.Refused): recorded as a failed attempt, refused. A new run
    that fails here (nothing recorded yet: its dataset would not extract) leaves no run dir behind."""
    try:
        yield
    except owned.Refused as exc:
        if record is None:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise
        now = _now()
        attempts = record.setdefault("attempts", [])
        if not (attempts and isinstance(attempts[-1], dict) and attempts[-1].get("status") == "running"):
            attempts.append({"started": now})
        attempts[-1].update(ended=now, status="failed")
        record.update(status="failed", reason=f"refused: {exc.message}", ended=now)
        with contextlib.suppress(OSError, UsageError), records.open_log(run_dir) as log:
            log.write(f"# envmgr: refused to start: {exc.message}\n")
        _write_record(run_dir, record, record_file, "after refusing the run")
        raise
    except BaseException:
        if record is None:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


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


def _inspect_outputs(ctx: Context, run_dir: Path, handover: run_outputs.Handover | None,
                     log_file: str = records.LOG) -> run_outputs.Outputs:
    """output/ as the method left it (run_outputs.py): what is listed, refused and changed, named in the log."""
    try:
        outputs = run_outputs.inspect(run_dir, handover)
    except (OSError, UsageError) as exc:
        reason = exc.message if isinstance(exc, UsageError) else str(exc)
        outputs = run_outputs.Outputs(refused=[{"path": records.OUTPUT, "reason": f"not inspected: {reason}"}])
    notes = ([f"{r['path']} is not listed as an output: {r['reason']}" for r in outputs.refused]
             + [f"{c['path']}: {c['change']}" for c in outputs.changed])
    if notes:
        with contextlib.suppress(OSError, UsageError), records.open_log(run_dir, log_file) as log:
            log.writelines(f"# envmgr: {note}\n" for note in notes)
        for note in notes:
            ctx.ui.warn(note)
    return outputs


def _given(request: RunRequest, previous: dict | None, run_dir: Path) -> tuple[list[RunInput], dict[str, str]]:
    """`--input` and `--env` as given, or on --resume without them, as the run's record says."""
    inputs = parse_inputs(request.inputs) if request.inputs or previous is None else recorded_inputs(previous, run_dir)
    env = parse_env(request.env) if request.env or previous is None else recorded_env(previous, run_dir)
    return inputs, env


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


def run(ctx: Context, request: RunRequest) -> dict:
    spec = request.method
    base_dir = ctx.config.base_dir
    prepare_base_dir(base_dir)
    limits = Limits.of(ctx, request)

    previous: dict | None = None
    node = request.node
    if request.resume or node:
        run_dir, previous = _node_record(base_dir, spec, node) if node else _resume(ctx, request, base_dir)
        run_id = previous["run_id"]
        recorded_args = previous.get("arguments")
        if not isinstance(recorded_args, list) or not all(isinstance(a, str) for a in recorded_args):
            raise UsageError(f"{run_dir / records.RECORD}: its arguments are not a list of strings")
        args = recorded_args + (["--resume"] if "--resume" not in recorded_args and not node else [])
        gpu_text = request.gpus if request.gpus is not None else previous.get("gpus")
        as_root = request.as_root or bool(previous.get("as_root"))
    else:
        run_id = new_run_id()
        run_dir = base_dir / "runs" / spec.name / run_id
        args = list(request.args)
        gpu_text = request.gpus
        as_root = request.as_root
    data = run_data(base_dir, request, previous)
    model = data.model

    gpus = resolve_gpus(ctx, spec, gpu_text if isinstance(gpu_text, str) else None)
    device_requests = gpu_devices(gpus)
    if device_requests and not ctx.engine.gpus_work(ensure_base(ctx, spec.base_image).image_id, device_requests):
        raise UsageError(f"{spec.name} asks for GPUs (--gpus {gpus}) but {NVIDIA_HINT}")
    # the variant and the host's driver/GPUs (envmgr/gpu_plan.py), before anything starts
    recorded_variant = previous.get("variant") if previous else None
    gpu_plan = gpu_preflight(ctx, spec, gpus.env_value(),
                             request.variant or (recorded_variant if isinstance(recorded_variant, str) else None))
    spec = gpu_plan.spec

    inputs, user_env = _given(request, previous, run_dir)
    files = given_files(request.files, previous, run_dir)
    user = _run_user(ctx, as_root)
    _check_inputs_readable([("model", model), ("dataset", data.dataset)]
                           + [(f"input {i.name}", i.path) for i in inputs]
                           + ([] if spec.workdir == "method" else [(f"file {f.path}", f.source) for f in files]), user)
    result = build_image(ctx, spec)
    gpu_plan.confirm(ctx, result.image_id)   # GPU architectures of the built image vs the host's GPUs
    run_dir.mkdir(parents=True, exist_ok=request.resume is not None or node is not None)
    output, work = run_dir / records.OUTPUT, run_dir / (node.work_dir if node else records.WORK)
    record_file = node.record_file if node else records.RECORD
    with _refusal_recorded(run_dir, previous, record_file):   # the method's own trees: never through a link
        for folder in (output, work):
            owned.ensure_folder(run_dir, folder.name, _ids(user))
        if spec.workdir == "method":
            place_files(files, copy_method(spec, work, user, _excluded(spec)), user)
        prepared = data.prepare(spec, run_dir, user)

    # Only output/ and the scratch work/ are writable by the method; run.json and log.txt are not mounted.
    mounts = [BindMount(work, paths.CONTAINER_RUN, read_only=False),
              BindMount(output, f"{paths.CONTAINER_RUN}/output", read_only=False)]
    platform_args = [f"--train_id={run_id}", f"--output_dir={paths.CONTAINER_RUN}/output"]
    if model:
        mounts.append(BindMount(model, f"{paths.CONTAINER_MODELS}/{model.name}", read_only=True))
        platform_args.insert(0, f"--model_path={paths.CONTAINER_MODELS}/{model.name}")
    if prepared:
        mounts.append(BindMount(prepared.path, prepared.target, read_only=prepared.read_only))
        platform_args.insert(1, f"--pic_relative_path={prepared.target}")
    mounts += [BindMount(i.path, i.target, read_only=True) for i in inputs]
    if spec.workdir != "method":    # no per-run copy: each --file over the image's method folder
        mounts += [BindMount(source, target, read_only=True) for source, target in mounts_over_image(files)]
    given = {a.split("=", 1)[0] for a in args}
    command = _entry_command(spec) + ([a for a in platform_args if a.split("=", 1)[0] not in given]
                                      if spec.platform_args else []) + args

    env = {"HOME": "/tmp", "HF_HUB_OFFLINE": "1", "ENVMGR_OUTPUT_DIR": f"{paths.CONTAINER_RUN}/output",
           "ENVMGR_RUN_ID": run_id, "MPLCONFIGDIR": "/tmp/matplotlib"}
    if model:
        env["ENVMGR_MODEL_PATH"] = f"{paths.CONTAINER_MODELS}/{model.name}"
    if prepared:
        env["ENVMGR_DATASET_PATH"] = prepared.target
    count = gpus.process_count(None)
    if gpus.wants_gpus:
        env["TRAINING_NUM_PROCESSES"] = str(count) if count else "auto"
    env.update(gpu_plan.env())   # ENVMGR_GPUS, and one process per GPU when the host's GPUs are known
    if not gpus.wants_gpus:
        env["NVIDIA_VISIBLE_DEVICES"] = "void"
        env["CUDA_VISIBLE_DEVICES"] = ""
    if inputs:
        env["ENVMGR_INPUTS_DIR"] = paths.CONTAINER_INPUTS
    env.update(user_env)   # names envmgr sets are refused in run_inputs.parse_env
    if node:
        env.update(node.env)

    container_name = f"envmgr-run-{spec.name}-{run_id}" + (f"-rank{node.rank}" if node and node.rank else "")
    with _refusal_recorded(run_dir, previous, record_file):
        _check_owned_mounts(mounts, run_dir)
    handover = run_outputs.Handover.for_invoker()
    record = previous or {}
    record.update({
        "layout": records.LAYOUT,
        "run_id": run_id, "method": spec.name, "image": {"id": result.image_id, "tag": result.tag},
        "lock_hash": result.lock_hash, "inputs_hash": result.inputs_hash,
        **data.record(prepared, run_dir, ctx.cache_dir),
        "inputs": [{"name": i.name, "path": str(i.path), "hash": content_hash(i.path, ctx.cache_dir)}
                   for i in inputs],
        "files": [{"source": str(f.source), "path": f.path, "hash": content_hash(f.source, ctx.cache_dir)}
                  for f in files],
        "env": user_env,
        "arguments": args, "command": command, "gpus": gpus.env_value(), "network": request.network,
        "host": socket.gethostname(), "user": getpass.getuser(), "run_as": user, "as_root": user == "0:0",
        "status": "running", "exit_code": None, "reason": None, "missing_outputs": None, "verdict": None,
        "container": container_name,
        "envmgr": {"pid": os.getpid(), "pid_start": _process_start(os.getpid()), "host": socket.gethostname()},
        "gpu": gpu_plan.record(), "variant": spec.variant, "outputs_for": handover.recorded(),
        "limits": limits.record(),
    })
    attempts = record.setdefault("attempts", [])
    if node and attempts:    # the attempt the submission opened for this job
        attempts[-1].update(started=attempts[-1].get("started") or _now(), ended=None, status="running")
    else:
        attempts.append({"started": _now(), "ended": None, "status": "running"})
    record["started"] = record.get("started") or _now()
    log_file = node.log_file if node else records.LOG
    records.open_log(run_dir, log_file).close()     # a link planted over log.txt stops the run before it starts
    _write_record(run_dir, record, record_file, "before the container started")
    with _refusal_recorded(run_dir, record, record_file):
        _check_owned_mounts(mounts, run_dir)    # again, as late as can be: nothing runs between this and the engine
    reserve = _reserve_space(run_dir, node.rank if node else 0)

    container = ContainerSpec(
        image=result.image_id, command=command, env=env, mounts=mounts,
        workdir=paths.CONTAINER_RUN if spec.workdir == "run" else _method_dir(spec),
        user=user, network=request.network, shm_size=limits.shm, name=container_name,
        device_requests=device_requests, labels={paths.LABEL_METHOD: spec.name, paths.LABEL_KIND: "run",
                                                 paths.LABEL_PREFIX + "run-id": run_id},
        stop_timeout=120,
    ).hardened(pids_limit=ctx.config.run.pids_limit, mem_limit=limits.memory, tmp_size=limits.tmp)
    ctx.ui.step(f"run {run_id}: {spec.name} in {result.tag} (gpus {gpus}, network {request.network}, "
                f"as {'root' if user == '0:0' else user})", run_id=run_id, run_dir=str(run_dir))
    started_ns, log_start = time.time_ns(), (run_dir / log_file).lstat().st_size   # this attempt's log follows
    ended = _follow(ctx, container, run_dir, log_file, node.on_start if node else None)
    outputs = _inspect_outputs(ctx, run_dir, handover, log_file)
    status, code, tail = ended.status, ended.code, ended.tail
    # exit 0 judged by what it wrote and how its log ends: a launcher that hides a crash (rank 0 judges a run)
    verdict = judge(spec, run_dir, code, started_ns, run_dir / log_file, log_start, record.get("dataset"),
                    outputs=not (node and node.rank)) if status in ("succeeded", "failed") else None
    if verdict:
        status = verdict.status
        record.update(verdict.fields())
    missing = bool(verdict and verdict.reason)   # an exit 0 turned failed: its rule says why, not the disk
    disk_full = _disk_full(output, ended) if status == "failed" and not missing and ended.engine_gone is None else None
    if ended.engine_gone is not None:   # its container may still be in the engine: settled once it is back
        record.update(reason=f"engine unreachable: {ended.engine_gone.message}", container_left=True)
    elif disk_full:
        record.update(reason="disk full", disk_full=disk_full)
    record.update(status=status, exit_code=code, ended=_now(), artifacts=outputs.artifacts(),
                  refused_outputs=outputs.refused, changed_outputs=outputs.changed, oom_killed=ended.oom_killed)
    record["attempts"][-1].update(ended=record["ended"], status=status)
    reserve.unlink(missing_ok=True)   # the room kept for this record, should the method have filled the disk
    _write_record(run_dir, record, record_file, f"after it {status}")
    if ended.engine_gone is not None:
        raise EngineError(f"run {run_id} failed: {ended.engine_gone.message} (recorded in {run_dir / record_file}; "
                          "`envmgr runs` removes its container once the engine is back)", hint=ENGINE_HINT)
    if disk_full:
        raise EnvmgrError(f"run {run_id} failed (disk full): no space left on {disk_full['filesystem']} "
                          f"({disk_full['free_bytes'] // 1024} KiB free now); log: {run_dir / log_file}",
                          hint=f"free space there, then `envmgr run {spec.name} --resume {run_id}` "
                               "continues from the last complete checkpoint")
    if status == "interrupted":
        _ignore_further_interrupts()   # the record is written; only the report and the exit are left
        raise Interrupted(f"run {run_id} interrupted: checkpoints kept in {output}",
                          hint=f"continue with `envmgr run {spec.name} --resume {run_id}`")
    if status == "failed":
        raise _failure(run_id, run_dir, record, tail, ctx.cache_dir, spec)
    return record


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

    status: str = "failed"
    code: int | None = None
    tail: list[str] = field(default_factory=list)
    oom_killed: bool = False
    engine_gone: EngineGone | None = None   # the engine stopped answering: its container may be left there
    log_error: OSError | None = None        # log.txt could not be written (a full disk): the tail is kept
    no_space_line: str | None = None        # the method's first line that says ENOSPC


def _write_record(run_dir: Path, record: dict, name: str, when: str) -> None:
    try:
        write_record(run_dir, record, name)
    except OSError as exc:
        raise EnvmgrError(f"run {record.get('run_id')}: cannot write {run_dir / name} {when} ({exc.strerror})",
                          hint="free space there; `envmgr runs` settles the run once envmgr can write it"
                          if exc.errno == errno.ENOSPC else None) from None


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
        event = _progress_event(line)
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
            ended.status = "succeeded" if ended.code == 0 else "failed"
        except (Interrupted, KeyboardInterrupt):
            ended.status = "interrupted"
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
        ended.status = "interrupted"
    ended.tail = list(tail)
    return ended


def _progress_event(line: str) -> dict | None:
    text = line.strip()
    if not (text.startswith("{") and '"event"' in text):
        return None
    try:
        event = json.loads(text)
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) and "event" in event else None


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


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _process_start(pid: int) -> str | None:
    """A process's start time (clock ticks since boot): with the pid it names one process, not a reused pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _owner_alive(record: dict) -> bool:
    scheduler = record.get("scheduler")
    if isinstance(scheduler, dict) and scheduler.get("kind") == "slurm":
        from .slurm import job_alive

        if job_alive(scheduler) is not False:
            return True         # Slurm still has the job (or does not answer): its steps own the record
    owner = record.get("envmgr")
    if not isinstance(owner, dict):
        return False            # a record without its envmgr (an older one): settle it
    if owner.get("host") != socket.gethostname():
        return True             # another machine's run in a shared base dir: not ours to settle
    pid = owner.get("pid")
    return isinstance(pid, int) and pid > 0 and _process_start(pid) is not None and (
        _process_start(pid) == owner.get("pid_start"))


def settle(ctx: Context, run_dir: Path, record: dict) -> dict:
    """A record still `running` whose envmgr is gone (SIGKILL, a crash): stop its container, record why.
    A run that ended when the engine stopped answering: remove the container it left, once the engine is back."""
    if record.get("container_left") is True and record.get("status") != "running":
        return _remove_left_container(ctx, run_dir, record)
    if record.get("status") != "running" or _owner_alive(record):
        return record
    recorded = record.get("container")
    name = recorded if isinstance(recorded, str) and recorded.startswith("envmgr-run-") else ""
    state = ctx.engine.container_state(name) if name else None
    if state and state["running"]:
        ctx.engine.stop_container(name, timeout=120)
        state = ctx.engine.container_state(name) or state
        status, reason = "interrupted", "envmgr was killed; its container was stopped by the next envmgr command"
    elif state:
        code = state["exit_code"]
        status = "succeeded" if code == 0 else "interrupted" if code in (130, 143) else "failed"
        reason = "envmgr was killed while the container ran; the container's exit status was read afterwards"
    else:
        status, reason = "failed", "envmgr was killed (no container of the run was left)"
    if state:
        with records.open_log(run_dir) as log:
            log.write(f"# envmgr: {reason}\n")
        ctx.engine.remove_container(name, force=True)
    for reserve in run_dir.glob(".envmgr-reserve-*"):   # the space its envmgr held for the final record
        reserve.unlink(missing_ok=True)
    code = state["exit_code"] if state else None
    outputs = _inspect_outputs(ctx, run_dir, run_outputs.Handover.from_record(record["outputs_for"])
                               if "outputs_for" in record else None)   # before the verdict reads them
    verdict = _verdict_after_kill(ctx, run_dir, record) if status == "succeeded" else None
    if verdict:
        record.update(verdict.fields())
        status, reason = verdict.status, verdict.reason or reason
    record.update(status=status, reason=reason, exit_code=code, ended=_now(), artifacts=outputs.artifacts(),
                  refused_outputs=outputs.refused, changed_outputs=outputs.changed)
    if record.get("attempts"):
        record["attempts"][-1].update(ended=record["ended"], status=status)
    write_record(run_dir, record)
    ctx.ui.warn(f"run {record.get('run_id')}: {reason} → {status}")
    return record


def _remove_left_container(ctx: Context, run_dir: Path, record: dict) -> dict:
    """The container a run left when the engine stopped answering: stopped if the engine kept it running, read
    and removed. The run stays failed (envmgr could not follow it); its exit status is recorded beside."""
    recorded = record.get("container")
    name = recorded if isinstance(recorded, str) and recorded.startswith("envmgr-run-") else ""
    state = ctx.engine.container_state(name) if name else None   # EngineError while the engine is still away
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
    write_record(run_dir, record)
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
