"""`envmgr method add`: a third-party training repository becomes a method, unforked.

Layout of an added method in the base dir:

    methods/<name>/envmgr.toml   the spec envmgr writes (edit its [adapt] and [env] tables)
    methods/<name>/source/       the repository, byte-identical to what was added (macOS junk dropped)
    methods/<name>/lock/         what envmgr writes: the effective manifest and its lock
"""

from __future__ import annotations

import shutil
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

import tomli_w
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from .archive import extract, single_top_folder
from .errors import UsageError
from .spec import MethodSpec, find_method, name_problem

SOURCE_DIR = "source"
LOCK_DIR = "lock"


_ENV_FILES = {"poetry": "pyproject.toml", "conda": "environment.yml", "pip": "requirements.txt"}


@dataclass
class Detected:
    backend: str
    reason: str
    note: str | None = None


def _names_in_requirements(path: Path) -> set[str]:
    names: set[str] = set()
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        try:
            names.add(canonicalize_name(Requirement(line).name))
        except InvalidRequirement:
            continue
    return names


def _names_in_pyproject(data: dict) -> set[str]:
    from .adapt import pyproject_names

    return pyproject_names(data)


def detect_backend(root: Path, choice: str | None) -> Detected:
    found: dict[str, str] = {}
    pyproject = root / "pyproject.toml"
    data: dict = {}
    if pyproject.is_file():
        try:
            data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise UsageError(f"{pyproject}: not valid TOML: {exc}") from None
        if "poetry" in data.get("tool", {}) or (root / "poetry.lock").is_file() or data.get("project", {}).get(
                "dependencies"):
            found["poetry"] = "pyproject.toml" + (" + poetry.lock" if (root / "poetry.lock").is_file() else "")
    for name in ("environment.yml", "environment.yaml"):
        if (root / name).is_file():
            found["conda"] = name
    if (root / "requirements.txt").is_file():
        found["pip"] = "requirements.txt"
    if choice:
        if choice not in found:
            raise UsageError(f"--backend {choice}: the repository has no "
                             f"{_ENV_FILES.get(choice, choice)}")
        return Detected(choice, found[choice])
    if not found:
        raise UsageError(f"{root}: no environment file found (pyproject.toml, environment.yml or requirements.txt)",
                         hint="add one to the repository, then `envmgr method add` again")
    order = [b for b in ("poetry", "conda", "pip") if b in found]
    winner = order[0]
    if len(order) > 1:
        note = f"found {', '.join(found[b] for b in order)}; using {found[winner]} ({winner})"
        if "pip" in order and winner == "poetry":
            extra = _names_in_requirements(root / "requirements.txt") - _names_in_pyproject(data)
            if extra:
                raise UsageError(f"{root}: pyproject.toml and requirements.txt disagree (requirements.txt also has "
                                 f"{', '.join(sorted(extra)[:5])}); poetry would win",
                                 hint="choose one with --backend poetry or --backend pip")
        return Detected(winner, found[winner], note + " (choose another with --backend)")
    return Detected(winner, found[winner])


def detect_entry(root: Path, entry: str | None) -> list[str]:
    if entry:
        path = root / entry
        if not path.is_file():
            raise UsageError(f"--entry {entry}: no such file in the repository")
        return ["bash", entry] if entry.endswith(".sh") else ["python", entry] if entry.endswith(".py") else [entry]
    for candidate, command in (("train.sh", ["bash", "train.sh"]), ("train.py", ["python", "train.py"])):
        if (root / candidate).is_file():
            return command
    raise UsageError(f"{root}: no train.sh or train.py at the top of the repository",
                     hint="name the entry with --entry PATH")


def add_method(base_dir: Path, source: Path, name: str, entry: str | None = None, backend: str | None = None,
               gpu: str = "optional") -> tuple[MethodSpec, Detected]:
    problem = name_problem(name)
    if problem:
        raise UsageError(f"--name {name!r}: {problem}")
    if not source.exists():
        raise UsageError(f"{source}: no such file or folder")
    try:
        find_method(name, base_dir)
        raise UsageError(f"a method named {name!r} already exists", hint="choose another --name")
    except UsageError as exc:
        if "already exists" in exc.message:
            raise
    methods = base_dir / "methods"
    methods.mkdir(parents=True, exist_ok=True)
    final = methods / name
    if final.exists():
        raise UsageError(f"{final} already exists", hint="choose another --name or remove that folder")
    staging = Path(tempfile.mkdtemp(dir=methods, prefix=f".adding-{name}-"))
    try:
        unpacked = staging / "unpacked"
        unpacked.mkdir()
        extract(source, unpacked)
        root = single_top_folder(unpacked)
        if not any(root.iterdir()):
            raise UsageError(f"{source}: holds no files (only macOS junk?)")
        detected = detect_backend(root, backend)
        command = detect_entry(root, entry)
        shutil.move(str(root), str(staging / SOURCE_DIR))
        shutil.rmtree(unpacked, ignore_errors=True)
        (staging / LOCK_DIR).mkdir()
        spec_data = {
            "name": name,
            "description": f"added from {source.name}",
            "backend": detected.backend,
            "source_dir": SOURCE_DIR,
            "lock_dir": LOCK_DIR,
            "entry": command,
            "gpu": gpu,
            "platform_args": False,
            "workdir": "method",
            "verdict": "training",
            "env": {"DISABLE_UPDATES": "1", "HF_HUB_OFFLINE": "1"},
            "adapt": {"pin": {}, "drop": [], "add": {}, "sources": {}},
        }
        header = ("# Written by `envmgr method add`. The repository is in source/ and stays as added:\n"
                  "# adapt it here instead. [adapt] pin = { pkg = \"1.2.3\" } replaces a range, git or URL source;\n"
                  "# drop = [\"pkg\"]; add = { pkg = \">=1\" }; sources = { index-name = \"default\" | \"mirror\" }.\n"
                  "# [env] is set for the entry (DISABLE_UPDATES stops launchers that install at start).\n"
                  "# verdict = \"training\": an exit 0 succeeds when the run wrote weights or a checkpoint under\n"
                  "# output/ and its log does not end in a traceback (caches and logs do not count).\n"
                  "# success = [\"output/lora.safetensors\"]: globs (relative to the run dir) that must each match\n"
                  "# a file the run wrote, instead.\n"
                  "# workdir = \"method\": the entry runs in a writable copy of source/ made for each run.\n"
                  "# [system] apt = [\"libgl1\"]: Debian packages from the site's apt mirror, in their own layer.\n"
                  "# dataset_mode = \"archive\" | \"extracted\" | \"writable\": the dataset as given, extracted\n"
                  "# read-only into the run, or a writable copy (default: an archive is extracted).\n")
        (staging / "envmgr.toml").write_text(header + tomli_w.dumps(spec_data))
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return find_method(name, base_dir), detected
