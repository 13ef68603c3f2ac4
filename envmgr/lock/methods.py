"""`envmgr method add`: a third-party training repository becomes a method, unforked.

Layout of an added method in the base dir:

    methods/<name>/envmgr.toml   the spec envmgr writes (edit its [adapt] and [env] tables)
    methods/<name>/source/       the repository, byte-identical to what was added (macOS junk dropped)
    methods/<name>/lock/         what envmgr writes: the effective manifest and its lock
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import tomllib
import zipfile
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


def _module_of(root: Path, relative: str) -> str | None:
    """`pkg.sub.train` for `pkg/sub/train.py` when every folder on the way is a package (has `__init__.py`):
    such a file imports its own package absolutely (`from pkg.helpers import ...`), which works when it runs
    as a module from the repository's folder (`python -m`), not as a script (its folder first on sys.path)."""
    parts = Path(relative).parts
    if len(parts) < 2 or not parts[-1].endswith(".py") or not all(p.isidentifier() for p in parts[:-1]):
        return None
    stem = parts[-1][:-3]
    if not stem.isidentifier():
        return None
    folder = root
    for part in parts[:-1]:
        folder = folder / part
        if not (folder / "__init__.py").is_file():
            return None
    return ".".join([*parts[:-1], stem])


_CONSOLE_SCRIPT = re.compile(r"[\"']([A-Za-z0-9_.-]+)\s*=\s*([A-Za-z0-9_.]+)(?::[A-Za-z0-9_.]+)?[\"']")


def _script_modules(root: Path, data: dict) -> list[str]:
    """The modules the project's console scripts call ([project.scripts], poetry's scripts, setup.py's
    console_scripts read as text), those whose script name says train, as repository paths that exist."""
    scripts: dict[str, str] = {}
    poetry_scripts = data.get("tool", {}).get("poetry", {}).get("scripts", {})
    for table in (data.get("project", {}).get("scripts", {}), poetry_scripts):
        scripts.update({k: v for k, v in table.items() if isinstance(v, str)})
    setup_py = root / "setup.py"
    if setup_py.is_file():
        text = setup_py.read_text(encoding="utf-8", errors="replace")
        scripts.update(dict(_CONSOLE_SCRIPT.findall(text)))
    found = []
    for name, target in scripts.items():
        module = target.split(":", 1)[0].strip()
        path = Path(*module.split(".")).with_suffix(".py").as_posix()
        if "train" in name.lower() and (root / path).is_file() and path not in found:
            found.append(path)
    return found


def _entry_command(root: Path, relative: str) -> list[str]:
    if relative.endswith(".sh"):
        return ["bash", relative]
    if relative.endswith(".py"):
        module = _module_of(root, relative)
        return ["python", "-m", module] if module else ["python", relative]
    return [relative]


def detect_entry(root: Path, entry: str | None, data: dict | None = None, shown: str | None = None) -> list[str]:
    """The command that starts the repository's training: `--entry`, else `train.sh` / `train.py` at the top,
    else the one training module of a package-shaped repository (`pkg/train.py`, or the module a console
    script named like train calls), run as a module. `shown` names the repository in messages."""
    if entry:
        path = root / entry
        if not path.is_file():
            raise UsageError(f"--entry {entry}: no such file in the repository")
        return _entry_command(root, entry)
    for candidate in ("train.sh", "train.py"):
        if (root / candidate).is_file():
            return _entry_command(root, candidate)
    candidates = _script_modules(root, data or {})
    for package in sorted(p for p in root.iterdir() if p.is_dir() and (p / "__init__.py").is_file()):
        inside = f"{package.name}/train.py"
        if (root / inside).is_file() and inside not in candidates:
            candidates.append(inside)
    candidates = [c for c in candidates if _module_of(root, c)]
    if len(candidates) == 1:
        return _entry_command(root, candidates[0])
    where = shown or str(root)
    if candidates:
        raise UsageError(f"{where}: no train.sh or train.py at the top of the repository, and "
                         f"{len(candidates)} training modules in its packages, one a line:"
                         + "".join(f"\n  --entry {c}" for c in candidates),
                         hint="name the one to run with --entry PATH (a file in a package runs as `python -m`)")
    raise UsageError(f"{where}: no train.sh or train.py at the top of the repository, and no package with a "
                     "train.py or a console script named like train",
                     hint="name the entry with --entry PATH")


def repository_date(source: Path) -> str | None:
    """The repository's own day (YYYY-MM-DD, UTC): the newest time its files carry (a folder's mtimes, an
    archive's member times; `.git` left out) or its newest commit, whichever is older (a fresh clone's files
    are as new as the clone; a release unpacked and committed today keeps its files' times). None: no time."""
    times: list[float] = []
    if source.is_dir():
        newest = 0.0
        for root, dirs, files in os.walk(source):
            dirs[:] = [d for d in dirs if d != ".git"]
            for name in files:
                with contextlib.suppress(OSError):
                    newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
        if newest:
            times.append(newest)
        if (source / ".git").exists() and shutil.which("git"):
            # reads the history only (no hook, no filter, no fsmonitor runs for `log`)
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                proc = subprocess.run(["git", "-c", "core.fsmonitor=false", "-c", f"safe.directory={source}",
                                       "-C", str(source), "log", "-1", "--format=%ct", "HEAD"],
                                      capture_output=True, text=True, timeout=20)
                if proc.returncode == 0 and proc.stdout.strip().isdigit():
                    times.append(float(proc.stdout.strip()))
    elif zipfile.is_zipfile(source):
        with contextlib.suppress(OSError, zipfile.BadZipFile, ValueError), zipfile.ZipFile(source) as zf:
            stamps = [datetime.datetime(*i.date_time, tzinfo=datetime.UTC).timestamp() for i in zf.infolist()
                      if not i.is_dir()]
            if stamps:
                times.append(max(stamps))
    else:
        with contextlib.suppress(OSError, tarfile.TarError), tarfile.open(source) as tf:
            stamps = [float(m.mtime) for m in tf.getmembers() if m.isfile()]
            if stamps:
                times.append(max(stamps))
    times = [t for t in times if t > 86400 * 365 * 10]   # an epoch-0 or fixed-time archive says nothing
    if not times:
        return None
    return datetime.datetime.fromtimestamp(min(times), datetime.UTC).date().isoformat()


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
        data = _pyproject_data(root)
        command = detect_entry(root, entry, data, shown=str(source))
        wanted, declared_in = requires_python(root, data)
        base = pick_base(wanted, f"{source.name} ({declared_in})")
        shutil.move(str(root), str(staging / SOURCE_DIR))
        shutil.rmtree(unpacked, ignore_errors=True)
        (staging / LOCK_DIR).mkdir()
        day = repository_date(source)
        spec_data = {
            "name": name,
            "description": f"added from {source.name}",
            **({"source_date": day} if day else {}),
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
        }
        # written as one-line tables, the shape every message proposes (`pin = { name = "1.0" }` replaces a line)
        adapt_table = ("\n[adapt]\npin = {}\ndrop = []\nadd = {}\nsources = {}\nbuild_from_source = []\n")
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
                  "# read-only into the run, or a writable copy (default: an archive is extracted).\n"
                  "# source_date: the repository's day; a pip repository that pins nothing is locked with\n"
                  "# the versions published by then ([adapt] resolve_as_of = \"YYYY-MM-DD\": another day,\n"
                  "# false: the newest).\n")
        (staging / "envmgr.toml").write_text(header + tomli_w.dumps(spec_data) + adapt_table)
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return find_method(name, base_dir), detected
