"""`envmgr run`: the method in its image, with models and the dataset mounted read-only from the
base directory, a fresh run directory as its output, GPUs as Engine device requests, live
progress from the method's JSON lines, and a run record (`run.json`)."""

from __future__ import annotations

import datetime as dt
import getpass
import hashlib
import json
import os
import secrets
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import paths
from .backends import entry_command
from .base import ensure_base
from .build import build as build_image
from .context import Context
from .engine import NVIDIA_HINT, BindMount, ContainerSpec, gpu_device_requests
from .errors import EnvmgrError, Interrupted, UsageError
from .spec import MethodSpec

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
    node: NodeStep | None = None   # set only by a scheduler's job step (envmgr/slurm.py)


# ---------------------------------------------------------------------- node-local hook (job steps)
@dataclass
class NodeStep:
    """A job step of a run a scheduler started (envmgr/slurm.py): the run dir and its record exist already
    (the inputs come from it), and several machines of one run may share the run dir: rank 0 owns
    run.json and log.txt, every other rank writes run-rank<N>.json and log-rank<N>.txt."""

    run_id: str
    run_dir: Path
    rank: int = 0
    env: dict[str, str] = field(default_factory=dict)       # rank / machine / rendezvous variables
    on_start: Callable[[str], None] | None = None

    @property
    def record_file(self) -> str:
        return "run.json" if self.rank == 0 else f"run-rank{self.rank}.json"

    @property
    def log_file(self) -> str:
        return "log.txt" if self.rank == 0 else f"log-rank{self.rank}.txt"
# ----------------------------------------------------------------------


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
        present = sorted(p.name for p in (base_dir / "models").iterdir() if p.is_dir()) if (base_dir / "models").is_dir() else []
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
    raise UsageError(f"dataset {name!r} not found under {base_dir / 'datasets'} (holds: {', '.join(present) or 'nothing'})")


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
    if known and known.get("stamp") == stamp.hexdigest():
        return known["hash"]
    sha = hashlib.sha256()
    for file in files:
        sha.update(str(file.relative_to(root)).encode() + b"\0")
        with open(file, "rb") as fh:
            while chunk := fh.read(1 << 20):
                sha.update(chunk)
    digest = "sha256:" + sha.hexdigest()
    if memo_file:
        memo[str(path)] = {"stamp": stamp.hexdigest(), "hash": digest}
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_file.with_name(f"{memo_file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo))
        tmp.replace(memo_file)
    return digest


def new_run_id() -> str:
    return dt.datetime.now().strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def artifacts(output: Path) -> dict[str, list[str]]:
    def rel(items):
        return sorted(str(p.relative_to(output.parent)) for p in items)

    if not output.is_dir():
        return {}
    return {
        "lora": rel(output.glob("*.safetensors")),
        "checkpoints": rel(p for p in output.glob("checkpoint-*") if p.is_dir()),
        "validation_images": rel((output / "validation_images").glob("*")) if (output / "validation_images").is_dir() else [],
        "loss_plot": rel(output.glob("loss.png")),
        "metrics": rel(output.glob("metrics.jsonl")),
    }


def _entry_command(spec: MethodSpec) -> list[str]:
    """The spec's entry with its method files made absolute (the container's cwd is the run dir)."""
    command = []
    for word in spec.entry:
        if not word.startswith("-") and (spec.source_path / word).is_file():
            word = f"{paths.CONTAINER_METHOD_DIR}/{word}"
        command.append(word)
    return entry_command(spec, command)   # e.g. through `conda run -n <m>` for a conda env


def _gpu_count(gpus: str) -> int | None:
    gpus = gpus.strip().lower()
    if gpus.isdigit():
        return int(gpus)
    if "," in gpus or (gpus not in ("all", "none") and gpus):
        return len([g for g in gpus.split(",") if g.strip()])
    return None


def write_record(run_dir: Path, record: dict, name: str = "run.json") -> None:
    tmp = run_dir / f"{name}.tmp"
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    tmp.replace(run_dir / name)


def run(ctx: Context, request: RunRequest) -> dict:
    spec = request.method
    base_dir = ctx.config.base_dir
    prepare_base_dir(base_dir)
    if request.gpus:
        gpus = request.gpus
    elif spec.gpu == "required" or (spec.gpu == "optional" and ctx.engine.has_nvidia_runtime()):
        gpus = "all"
    else:
        gpus = "none"
    device_requests = gpu_device_requests(gpus)
    if device_requests and not ctx.engine.gpus_work(ensure_base(ctx, spec.base_image).image_id, device_requests):
        raise UsageError(f"{spec.name} asks for GPUs (--gpus {gpus}) but {NVIDIA_HINT}")

    previous: dict | None = None
    node = request.node
    if request.resume or node:
        run_id = node.run_id if node else str(request.resume)
        run_dir = node.run_dir if node else base_dir / "runs" / spec.name / run_id
        if not (run_dir / "run.json").is_file():
            raise UsageError(f"no run {run_id!r} of {spec.name} under {run_dir.parent}")
        previous = json.loads((run_dir / "run.json").read_text())
        model = Path(previous["model"]["path"]) if previous.get("model") else None
        dataset = Path(previous["dataset"]["path"]) if previous.get("dataset") else None
        args = previous["arguments"] + (["--resume"] if "--resume" not in previous["arguments"] and not node else [])
    else:
        model = resolve_model(base_dir, request.model, spec)
        dataset = resolve_dataset(base_dir, request.dataset)
        run_id = new_run_id()
        run_dir = base_dir / "runs" / spec.name / run_id
        args = list(request.args)

    result = build_image(ctx, spec)
    run_dir.mkdir(parents=True, exist_ok=request.resume is not None or node is not None)
    output = run_dir / "output"
    output.mkdir(exist_ok=True)

    mounts = [BindMount(run_dir, paths.CONTAINER_RUN, read_only=False)]
    platform_args = [f"--train_id={run_id}", f"--output_dir={paths.CONTAINER_RUN}/output"]
    if model:
        mounts.append(BindMount(model, f"{paths.CONTAINER_MODELS}/{model.name}", read_only=True))
        platform_args.insert(0, f"--model_path={paths.CONTAINER_MODELS}/{model.name}")
    if dataset:
        mounts.append(BindMount(dataset, f"{paths.CONTAINER_DATA}/{dataset.name}", read_only=True))
        platform_args.insert(1, f"--pic_relative_path={paths.CONTAINER_DATA}/{dataset.name}")
    given = {a.split("=", 1)[0] for a in args}
    command = _entry_command(spec) + ([a for a in platform_args if a.split("=", 1)[0] not in given]
                                      if spec.platform_args else []) + args

    env = {"HOME": "/tmp", "HF_HUB_OFFLINE": "1", "ENVMGR_OUTPUT_DIR": f"{paths.CONTAINER_RUN}/output",
           "ENVMGR_RUN_ID": run_id, "MPLCONFIGDIR": "/tmp/matplotlib"}
    if model:
        env["ENVMGR_MODEL_PATH"] = f"{paths.CONTAINER_MODELS}/{model.name}"
    if dataset:
        env["ENVMGR_DATASET_PATH"] = f"{paths.CONTAINER_DATA}/{dataset.name}"
    count = _gpu_count(gpus)
    if count:
        env["TRAINING_NUM_PROCESSES"] = str(count)
    elif gpus == "all" and device_requests:
        env["TRAINING_NUM_PROCESSES"] = "auto"
    if not device_requests:
        env["NVIDIA_VISIBLE_DEVICES"] = "void"
        env["CUDA_VISIBLE_DEVICES"] = ""
    if node:
        env.update(node.env)

    record = previous or {}
    record.update({
        "run_id": run_id, "method": spec.name, "image": {"id": result.image_id, "tag": result.tag},
        "lock_hash": result.lock_hash, "inputs_hash": result.inputs_hash,
        "model": {"name": model.name, "path": str(model), "hash": content_hash(model, ctx.cache_dir)} if model else None,
        "dataset": {"name": dataset.name, "path": str(dataset), "hash": content_hash(dataset, ctx.cache_dir)}
        if dataset else None,
        "arguments": args, "command": command, "gpus": gpus, "network": request.network,
        "host": socket.gethostname(), "user": getpass.getuser(), "status": "running", "exit_code": None,
    })
    attempts = record.setdefault("attempts", [])
    if node and attempts and attempts[-1].get("status") == "pending":   # the scheduler's attempt starts now
        attempts[-1].update(started=_now(), status="running")
    else:
        attempts.append({"started": _now(), "ended": None, "status": "running"})
    record["started"] = record.get("started") or _now()
    record_file = node.record_file if node else "run.json"
    write_record(run_dir, record, record_file)

    shm = request.shm_size or _default_shm()
    container = ContainerSpec(
        image=result.image_id, command=command, env=env, mounts=mounts,
        workdir=paths.CONTAINER_RUN if spec.workdir == "run" else paths.CONTAINER_METHOD_DIR,
        user=f"{os.getuid()}:{os.getgid()}", network=request.network, shm_size=shm,
        device_requests=device_requests, labels={paths.LABEL_METHOD: spec.name, paths.LABEL_KIND: "run",
                                                 paths.LABEL_PREFIX + "run-id": run_id},
        stop_timeout=120,
    )
    ctx.ui.step(f"run {run_id}: {spec.name} in {result.tag} (gpus {gpus}, network {request.network})",
                run_id=run_id, run_dir=str(run_dir))
    status, code, tail = _follow(ctx, container, run_dir, node.log_file if node else "log.txt",
                                 node.on_start if node else None)
    record.update(status=status, exit_code=code, ended=_now(), artifacts=artifacts(output),
                  oom_killed=container.oom_killed)
    record["attempts"][-1].update(ended=record["ended"], status=status)
    write_record(run_dir, record, record_file)
    if status == "interrupted":
        raise Interrupted(f"run {run_id} interrupted: checkpoints kept in {output}",
                          hint=f"continue with `envmgr run {spec.name} --resume {run_id}`")
    if status == "failed":
        why = "the container was killed for lack of memory (OOM)" if container.oom_killed else f"exit {code}"
        last = "\n".join(f"    {line}" for line in tail)
        raise EnvmgrError(f"run {run_id} failed ({why}); log: {run_dir / 'log.txt'}\n  last lines:\n{last}")
    return record


def _follow(ctx: Context, container: ContainerSpec, run_dir: Path, log_file: str = "log.txt",
            on_start: Callable[[str], None] | None = None) -> tuple[str, int | None, list[str]]:
    tail: deque[str] = deque(maxlen=12)
    log = open(run_dir / log_file, "a", encoding="utf-8")
    progress_cm = None
    task = None
    started = time.monotonic()

    def on_line(line: str) -> None:
        nonlocal progress_cm, task
        line = ctx.ui.redact(line)
        log.write(line + "\n")
        log.flush()
        tail.append(line)
        event = _progress_event(line)
        if event is None:
            ctx.ui.log(line)
            return
        ctx.ui.event("method." + str(event.get("event")), **{k: v for k, v in event.items() if k != "event"})
        if event.get("event") == "progress" and ctx.ui.mode == "rich":
            if task is None:
                progress_cm = _step_bar(ctx, event.get("max_steps"))
                task = progress_cm.__enter__()
            task.update(task.task_ids[0], completed=event.get("step", 0),
                        loss=f"{event.get('loss', float('nan')):.4f}", sps=f"{event.get('s_per_step', 0):.2f}")
        elif event.get("event") == "progress" and ctx.ui.mode == "plain":
            step, total = event.get("step"), event.get("max_steps")
            if step == 1 or step == total or (total and step % max(1, total // 10) == 0):
                ctx.ui.info(f"step {step}/{total} loss {event.get('loss', 0):.4f} "
                            f"{event.get('s_per_step', 0):.2f} s/step")

    code: int | None = None
    try:
        code = ctx.engine.run(container, on_line=on_line, on_start=on_start)
        status = "succeeded" if code == 0 else "failed"
    except Interrupted:
        status = "interrupted"
    except EnvmgrError as exc:  # the engine went away mid-run: record it, then report it
        status = "failed"
        tail.append(f"envmgr: {exc.message}")
        code = None
    finally:
        if progress_cm is not None:
            progress_cm.__exit__(None, None, None)
        log.write(f"# envmgr: container ended after {time.monotonic() - started:.1f} s\n")
        log.close()
    if code == 130:
        status = "interrupted"
    return status, code, list(tail)


def _step_bar(ctx: Context, total):
    return _ProgressWrapper(ctx, total)


class _ProgressWrapper:
    def __init__(self, ctx: Context, total):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[sps]} s/step"),
                                 TextColumn("ETA"), TimeRemainingColumn(), console=ctx.ui.console)
        self.total = total

    def __enter__(self):
        self.progress.__enter__()
        self.progress.add_task("training", total=self.total, loss="-", sps="-")
        return self.progress

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)


def _progress_event(line: str) -> dict | None:
    text = line.strip()
    if not (text.startswith("{") and '"event"' in text):
        return None
    try:
        event = json.loads(text)
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) and "event" in event else None


def _default_shm() -> str:
    """Data loaders share tensors through /dev/shm: a quarter of the host's memory, at most 16 GiB."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return "2g"
    return f"{max(1, min(16, total // (4 << 30)))}g"


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def list_runs(base_dir: Path, method: str | None = None) -> list[dict]:
    root = base_dir / "runs"
    records = []
    for path in sorted(root.glob(f"{method or '*'}/*/run.json")):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    return records


def find_run(base_dir: Path, run_id: str) -> dict:
    for path in (base_dir / "runs").glob(f"*/{run_id}/run.json"):
        return {**json.loads(path.read_text()), "run_dir": str(path.parent)}
    raise UsageError(f"no run {run_id!r} under {base_dir / 'runs'}", hint="`envmgr runs` lists them")
