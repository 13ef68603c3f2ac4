"""What a run is handed at start, without a rebuild: `--input PATH[:NAME]` (read-only at
/envmgr/inputs/NAME, hashed in run.json) and `--env K=V` (recorded in run.json, never in the image);
and, for `workdir = "method"`, the run's own writable copy of the method's files."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from envmgr.core import names, paths
from envmgr.core.errors import UsageError
from envmgr.core.spec import MethodSpec
from envmgr.runs import owned, records

INPUT_NAME_RE = names.INPUT
ENV_NAME_RE = names.ENV_VAR
# What envmgr sets itself for every run (or the image for the environment): `--env` cannot change it.
RESERVED_ENV = frozenset({"HOME", "PATH", "VIRTUAL_ENV", "HF_HUB_OFFLINE", "MPLCONFIGDIR", "TRAINING_NUM_PROCESSES",
                          "CUDA_VISIBLE_DEVICES"})
RESERVED_ENV_PREFIXES = (paths.ENV_PREFIX, "NVIDIA_")
METHOD_COPY = "method"          # <run_dir>/work/method, at paths.CONTAINER_RUN_METHOD


@dataclass(frozen=True)
class RunInput:
    name: str
    path: Path

    @property
    def target(self) -> str:
        return f"{paths.CONTAINER_INPUTS}/{self.name}"


def _input_name(name: str, given: str) -> str:
    if not names.is_valid(INPUT_NAME_RE, name) or name in (".", ".."):
        raise UsageError(f"--input {given}: {name!r} is not a usable name (letters, digits, '.', '_', '-')",
                         hint="name it: --input PATH:NAME")
    return name


def parse_input(text: str) -> RunInput:
    """`PATH` or `PATH:NAME` (a path that itself holds a colon is taken whole when it exists)."""
    head, sep, tail = text.rpartition(":")
    whole = Path(text).expanduser()
    if sep and head and names.is_valid(INPUT_NAME_RE, tail) and not (whole.exists() or whole.is_symlink()) \
            and Path(head).expanduser().exists():
        raw, name = head, tail
    else:
        raw, name = text, None
    path = Path(raw).expanduser()
    if not path.exists():
        raise UsageError(f"--input {text}: {path} does not exist", hint="give an existing file or folder")
    path = path.resolve()
    return RunInput(_input_name(name or path.name, text), path)


def parse_inputs(texts: list[str]) -> list[RunInput]:
    inputs = [parse_input(text) for text in texts]
    names = [i.name for i in inputs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UsageError(f"--input: the name {twice[0]!r} is given twice", hint="name them apart: --input PATH:NAME")
    return inputs


def env_problem(name: str) -> str | None:
    if not names.is_valid(ENV_NAME_RE, name):
        return "not a variable name (letters, digits and '_', not starting with a digit)"
    if name in RESERVED_ENV or name.startswith(RESERVED_ENV_PREFIXES):
        return "envmgr sets it itself"
    return None


def parse_env(texts: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for text in texts:
        name, sep, value = text.partition("=")
        if not sep:
            raise UsageError(f"--env {text!r}: expected NAME=VALUE")
        problem = env_problem(name)
        if problem:
            raise UsageError(f"--env {name}: {problem}")
        if "\0" in value:
            raise UsageError(f"--env {name}: the value holds a NUL byte")
        if name in env:
            raise UsageError(f"--env {name} is given twice")
        env[name] = value
    return env


def recorded_inputs(record: dict[str, Any], run_dir: Path) -> list[RunInput]:
    """The inputs a run was given, from envmgr's record: each named well and still there."""
    where = run_dir / records.RECORD
    entries = record.get("inputs") or []
    if not isinstance(entries, list):
        raise UsageError(f"{where}: its inputs are not a list")
    found = []
    for entry in entries:
        name = entry.get("name") if isinstance(entry, dict) else None
        raw = entry.get("path") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not names.is_valid(INPUT_NAME_RE, name) or name in (".", ".."):
            raise UsageError(f"{where}: an input without a valid name ({entry!r})")
        if not isinstance(raw, str) or not Path(raw).is_absolute():
            raise UsageError(f"{where}: input {name!r} has no absolute path ({raw!r})")
        if not Path(raw).exists():
            raise UsageError(f"the input {name!r} this run used is gone: {raw}",
                             hint="give it again: `--input PATH:NAME` with --resume")
        if os.path.realpath(raw) != os.path.normpath(raw):   # recorded resolved: a link there now is someone's
            raise owned.Refused(f"the input {name!r} this run used is reached through a symbolic link now: {raw}",
                                hint="give it again: `--input PATH:NAME` with --resume")
        found.append(RunInput(name, Path(os.path.normpath(raw))))
    if len({i.name for i in found}) != len(found):
        raise UsageError(f"{where}: an input name appears twice")
    return found


def recorded_env(record: dict[str, Any], run_dir: Path) -> dict[str, str]:
    env = record.get("env") or {}
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise UsageError(f"{run_dir / records.RECORD}: its env is not a table of strings")
    for name, value in env.items():
        problem = env_problem(name)
        if problem or "\0" in value:
            raise UsageError(f"{run_dir / records.RECORD}: env {name!r}: {problem or 'holds a NUL byte'}")
    return env


def copy_method(spec: MethodSpec, work: Path, user: str, excluded: Any) -> Path:
    """The method's files (what its image's method layer holds) copied into `work/method` for `user`.

    Made by envmgr on the host before the container starts; an existing copy (a resumed run) is
    kept as the method left it.
    """
    dest = work / METHOD_COPY
    if owned.is_folder(work, METHOD_COPY):   # a link there (or on its way) is refused, never followed
        return dest
    source = spec.source_path
    shutil.copytree(source, dest, symlinks=True,
                    ignore=lambda d, names: [n for n in names if excluded(str(Path(d, n).relative_to(source)))])
    uid, gid = (int(x) for x in user.split(":"))
    # the owner can write what it was given, whatever the repository's modes
    owned.give(work, METHOD_COPY, (uid, gid), dir_bits=0o700, file_bits=0o600)
    return dest
