"""`envmgr method add`: a third-party training repository becomes a method, unforked.

Layout of an added method in the base dir:

    methods/<name>/envmgr.toml   the spec envmgr writes (edit its [adapt] and [env] tables)
    methods/<name>/source/       the repository, byte-identical to what was added (macOS junk dropped)
    methods/<name>/lock/         what envmgr writes: the effective manifest and its lock
"""

from __future__ import annotations

import re
import shutil
import tempfile
import tomllib
from pathlib import Path

import tomli_w

from envmgr.core.archive import extract, single_top_folder
from envmgr.core.errors import UsageError
from envmgr.core.spec import MethodSpec, find_method, name_problem
from envmgr.images.base import pick_base, python_series
from envmgr.lock.backends import Detected, detect

SOURCE_DIR = "source"
LOCK_DIR = "lock"


def _pyproject_data(root: Path) -> dict:
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file():
        return {}
    try:
        return tomllib.loads(pyproject.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{pyproject}: not valid TOML: {exc}") from None


def detect_backend(root: Path, choice: str | None) -> Detected:
    """Which backend the repository's environment files make (each backend answers for its own files)."""
    return detect(root, _pyproject_data(root), choice)


_POETRY_CARET = re.compile(r"\^(\d+)(?:\.(\d+))?(?:\.(\d+))?")
_POETRY_TILDE = re.compile(r"~(\d+)\.(\d+)(?:\.(\d+))?")


def _poetry_python(constraint: str) -> str:
    """poetry's `python = "^3.12"` (or `~3.10`, `>=3.10,<3.13`, `3.12.*`) as a PEP 440 specifier; `||`
    alternatives keep the first (they are rare for python and only widen it)."""
    first = constraint.split("||")[0].strip()
    parts = []
    for part in re.split(r"[,\s]+", first):
        if not part or part == "*":
            continue
        if caret := _POETRY_CARET.fullmatch(part):
            major, minor = int(caret.group(1)), int(caret.group(2) or 0)
            upper = f"{major + 1}" if major else f"0.{minor + 1}"
            parts += [f">={part[1:]}", f"<{upper}"]
        elif tilde := _POETRY_TILDE.fullmatch(part):
            parts += [f">={part[1:]}", f"<{tilde.group(1)}.{int(tilde.group(2)) + 1}"]
        elif part[0].isdigit():
            parts.append(f"=={part}")
        else:
            parts.append(part)
    return ",".join(parts)


def requires_python(root: Path, data: dict) -> tuple[str | None, str]:
    """The Python a repository declares, as a PEP 440 specifier, and where it was read: pyproject's
    [project] requires-python, poetry's python dependency, or setup.cfg's / setup.py's python_requires
    (read as text: nothing of the repository is executed)."""
    declared = data.get("project", {}).get("requires-python")
    if isinstance(declared, str):
        return declared, "pyproject.toml [project] requires-python"
    for table in (data.get("tool", {}).get("poetry", {}).get("dependencies", {}),):
        if isinstance(table.get("python"), str):
            return _poetry_python(table["python"]), "pyproject.toml [tool.poetry.dependencies] python"
    for name in ("setup.cfg", "setup.py"):
        path = root / name
        if path.is_file():
            found = re.search(r"python_requires\s*=\s*[\"']?([<>=!~.,\d\s*]+)", path.read_text(errors="replace"))
            if found and found.group(1).strip():
                return found.group(1).strip().rstrip(","), f"{name} python_requires"
    return None, ""


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
        wanted, declared_in = requires_python(root, _pyproject_data(root))
        base = pick_base(wanted, f"{source.name} ({declared_in})")
        shutil.move(str(root), str(staging / SOURCE_DIR))
        shutil.rmtree(unpacked, ignore_errors=True)
        (staging / LOCK_DIR).mkdir()
        spec_data = {
            "name": name,
            "description": f"added from {source.name}",
            "backend": detected.backend,
            "python": python_series(base),
            "base_image": base.name,
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
