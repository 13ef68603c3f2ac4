"""What a run is before any target starts it: the request (`RunRequest`, a scheduler's `NodeStep`), the base
directory, its model and dataset (`RunData`, as given or as a record says), `--input`/`--env` as given or
recorded, who the method runs as, its entry command, content hashes, run ids, the method's progress lines,
and a refusal recorded in run.json. The local run (envmgr/runs/run.py) and the Slurm target
(envmgr/runs/slurm.py) both build on it; it imports neither."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from envmgr.core import paths
from envmgr.core.errors import UsageError
from envmgr.core.files import atomic_write
from envmgr.core.spec import MethodSpec
from envmgr.door.context import Context
from envmgr.images.image import file_sha256
from envmgr.lock.backends import entry_command
from envmgr.runs import owned, records
from envmgr.runs.datasets import RunDataset, prepare_dataset, record as dataset_record
from envmgr.runs.inputs import RunInput, parse_env, parse_inputs, recorded_env, recorded_inputs
from envmgr.runs.records import Status

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
    variant: str | None = None     # None: the newest variant this host's GPUs can use (envmgr/runs/gpu_plan.py)
    inputs: list[str] = field(default_factory=list)   # `--input PATH[:NAME]`
    env: list[str] = field(default_factory=list)      # `--env K=V`
    files: list[str] = field(default_factory=list)    # `--file SRC:REL` (envmgr/runs/method_files.py)
    node: NodeStep | None = None   # set only by a scheduler's job step (envmgr/runs/slurm.py)


@dataclass
class NodeStep:
    """A job step of a run a scheduler started (envmgr/runs/slurm.py): the run dir and its record exist already
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


def now() -> str:
    """A record's timestamps: UTC, to the second."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def method_dir(spec: MethodSpec) -> str:
    """Where the method's files are in its container: the run's writable copy for workdir = "method"."""
    return paths.CONTAINER_RUN_METHOD if spec.workdir == "method" else paths.CONTAINER_METHOD_DIR


def method_command(spec: MethodSpec) -> list[str]:
    """The spec's entry with its method files made absolute (the container's cwd is the run dir)."""
    command = []
    for word in spec.entry:
        if not word.startswith("-") and (spec.source_path / word).is_file():
            word = f"{method_dir(spec)}/{word}"
        command.append(word)
    return entry_command(spec, command)   # e.g. through `conda run -n <m>` for a conda env


def run_user(ctx: Context, as_root: bool) -> str:
    """Who the method runs as: the invoking user; for root, the sudo caller or the site's `run_as`."""
    if os.getuid() != 0:
        return f"{os.getuid()}:{os.getgid()}"
    if as_root:
        return "0:0"
    if os.environ.get("SUDO_UID", "").isdigit() and os.environ["SUDO_UID"] != "0":
        return f"{os.environ['SUDO_UID']}:{os.environ.get('SUDO_GID', os.environ['SUDO_UID'])}"
    return ctx.config.run.run_as


def ids(user: str) -> tuple[int, int]:
    """`uid:gid` as numbers."""
    uid, gid = (int(x) for x in user.split(":"))
    return uid, gid


def given(request: RunRequest, previous: dict | None, run_dir: Path) -> tuple[list[RunInput], dict[str, str]]:
    """`--input` and `--env` as given, or on --resume without them, as the run's record says."""
    inputs = parse_inputs(request.inputs) if request.inputs or previous is None else recorded_inputs(previous, run_dir)
    env = parse_env(request.env) if request.env or previous is None else recorded_env(previous, run_dir)
    return inputs, env


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
    says. A local run and a Slurm submission (envmgr/runs/slurm.py) resolve, prepare and record them here."""

    model: Path | None
    dataset: Path | None
    recorded_mode: str | None = None     # the record's dataset_mode, kept while the dataset is not named again

    def prepare(self, spec: MethodSpec, run_dir: Path, user: str) -> RunDataset | None:
        """The dataset as the run sees it (run_datasets.py): extracted or copied into the run dir once. The
        writable copy lives in rank 0's work/, so a scheduler's job steps all find the one its submission made."""
        if self.dataset is None:
            return None
        work = owned.ensure_folder(run_dir, records.WORK, ids(user))   # a link there is refused
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


def inputs_record(inputs: list[RunInput], cache_dir: Path) -> list[dict[str, str]]:
    """run.json's `inputs`: each `--input` with its name, path and content hash."""
    return [{"name": i.name, "path": str(i.path), "hash": content_hash(i.path, cache_dir)} for i in inputs]


def progress_event(line: str) -> dict | None:
    """A line of the method's output that is one of its JSON events (`{"event": "progress", ...}`), else None."""
    text = line.strip()
    if not (text.startswith("{") and '"event"' in text):
        return None
    try:
        event = json.loads(text)
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) and "event" in event else None


def end_attempt(record: dict[str, Any], status: str) -> None:
    """The record's last attempt ends as the run did (its `ended` and `status`)."""
    if record.get("attempts"):
        record["attempts"][-1].update(ended=record["ended"], status=status)


@contextlib.contextmanager
def refusal_recorded(run_dir: Path, record: dict | None, record_file: str) -> Iterator[None]:
    """A run dir the method changed into links (owned.Refused): recorded as a failed attempt, refused. A new run
    that fails here (nothing recorded yet: its dataset would not extract) leaves no run dir behind."""
    try:
        yield
    except owned.Refused as exc:
        if record is None:
            shutil.rmtree(run_dir, ignore_errors=True)
            raise
        stamp = now()
        attempts = record.setdefault("attempts", [])
        if not (attempts and isinstance(attempts[-1], dict) and attempts[-1].get("status") == Status.RUNNING):
            attempts.append({"started": stamp})
        attempts[-1].update(ended=stamp, status=Status.FAILED)
        record.update(status=Status.FAILED, reason=f"refused: {exc.message}", ended=stamp)
        with contextlib.suppress(OSError, UsageError), records.open_log(run_dir) as log:
            log.write(f"# envmgr: refused to start: {exc.message}\n")
        records.save(run_dir, record, record_file, "after refusing the run")
        raise
    except BaseException:
        if record is None:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
