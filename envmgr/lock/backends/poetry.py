"""Poetry methods: `pyproject.toml` + `poetry.lock`.

Locking runs a pinned poetry inside a container of the method's base image (same OS, arch and
Python as production). The site's PyPI mirror reaches poetry through poetry-plugin-pypi-mirror,
so pyproject.toml is never touched and the lock records no mirror. Installing exports the lock to
exact, hashed pins for the target and installs them with uv (parallel downloads, hash-checked,
nothing resolved), the fastest exact installer we know of.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import re
import shutil
import tempfile
import tomllib
from pathlib import Path

import tomli_w
from packaging.utils import canonicalize_name

from envmgr.core import paths
from envmgr.core.errors import EnvmgrError, MirrorError, StaleLockError, UsageError
from envmgr.core.files import atomic_write, open_lock
from envmgr.core.spec import MethodSpec
from envmgr.door.containers import BindMount
from envmgr.door.context import Context
from envmgr.door.mirrors import mirror_hosts, poetry_env
from envmgr.door.steps import sdist_only_error
from envmgr.images.base import BaseImage
from envmgr.lock.adapt import (
    adapt_pyproject,
    lock_drift,
    locked_versions,
    pyproject_names,
    raise_if_unreachable,
    seed_lock,
    unreachable_in_pyproject,
)
from envmgr.lock.backends import source_builds
from envmgr.lock.backends.common import (
    install_requirements_script,
    missing_lock,
    requirement_names,
    run_step,
    uv_mounts,
    uv_step_env,
)
from envmgr.lock.backends.poetry_lock import file_hashes, select
from envmgr.lock.backends.protocol import Evidence

POETRY_VERSION = "2.5.1"
PYPI_MIRROR_PLUGIN_VERSION = "0.6.5"
LOCK = "poetry.lock"
PYPROJECT = "pyproject.toml"
TOOLS_BYTECODE = ".bytecode"    # marks a lock-tools venv whose .pyc files are written

_LEGACY_KEYS = ["dependencies", "source", "extras", "dev-dependencies"]
_RELEVANT_KEYS = [*_LEGACY_KEYS, "group"]
_RELEVANT_PROJECT_KEYS = ["requires-python", "dependencies", "optional-dependencies"]


def content_hash(pyproject: dict) -> str:
    """poetry's `[metadata] content-hash` of a pyproject (the parts that change what is locked)."""
    project = pyproject.get("project", {})
    groups = pyproject.get("dependency-groups", {})
    tool_poetry = pyproject.get("tool", {}).get("poetry", {})
    relevant_project = {key: project[key] for key in _RELEVANT_PROJECT_KEYS if project.get(key) is not None}
    relevant_poetry = {}
    for key in _RELEVANT_KEYS:
        value = tool_poetry.get(key)
        if value is None and (key not in _LEGACY_KEYS or relevant_project):
            continue
        relevant_poetry[key] = value
    if relevant_project:
        relevant: dict = {"project": relevant_project, "tool": {"poetry": relevant_poetry}}
        if groups:
            relevant["dependency-groups"] = groups
    else:
        relevant = relevant_poetry
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


def target_environment(base: BaseImage, spec: MethodSpec) -> dict[str, str]:
    machine = {"linux-64": "x86_64", "linux-aarch64": "aarch64"}[spec.platform]
    full = base.python_version or f"{spec.python}.0"
    return {
        "implementation_name": "cpython", "implementation_version": full, "os_name": "posix",
        "platform_machine": machine, "platform_python_implementation": "CPython", "platform_release": "",
        "platform_system": "Linux", "platform_version": "", "python_full_version": full,
        "python_version": ".".join(full.split(".")[:2]), "sys_platform": "linux", "extra": "",
    }


# what poetry and its build tools print that is not poetry's answer
_NOISE = re.compile(r"(Warning|warnings\.warn|deprecat|setuptools|pkg_resources|^\s*!!|^\s*\*{5,}|"
                    r"^\s*Updating dependencies|^\s*Resolving dependencies|^\s*Writing lock file)", re.I)
_LOCAL_LABEL = re.compile(r"\d\+[A-Za-z0-9.]+")

SDIST_MARK = "ENVMGR-SDIST-ONLY "
# poetry locks with this in front: poetry reads an sdist's static metadata itself (PKG-INFO, pyproject.toml),
# and where that is not enough it would run the sdist's build backend in an isolated build (with the network
# and the mirror credentials of the lock step). Instead the metadata comes from a wheel envmgr built in its
# box (ENVMGR_BUILT: [adapt] build_from_source), or poetry stops at once and names the package.
WHEELS_ONLY_POETRY = f"""\
import os, re, sys
from pathlib import Path

import poetry.inspection.info as info
import poetry.utils.isolated_build as isolated_build


def normal(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def named(path):
    path = Path(path)
    pkg_info = path / "PKG-INFO"
    if pkg_info.is_file():
        fields = dict(line.split(": ", 1) for line in pkg_info.read_text(errors="replace").splitlines()[:20]
                      if ": " in line)
        if "Name" in fields and "Version" in fields:
            return fields["Name"].strip(), fields["Version"].strip()
    name, _, version = path.name.rpartition("-")
    return name or path.name, version


def metadata_without_building(path):
    name, version = named(path)
    built = Path(os.environ.get("ENVMGR_BUILT", "/nonexistent"))
    for wheel in sorted(built.glob("*.whl")) if built.is_dir() else []:
        parts = wheel.name.split("-")
        if normal(parts[0]) == normal(name) and parts[1] == version:
            return info.PackageInfo.from_wheel(wheel)
    sys.stderr.write("{SDIST_MARK}" + name + "\\n")
    sys.stderr.flush()
    os._exit(97)


def no_isolated_build(*args, **kwargs):
    sys.stderr.write("{SDIST_MARK}" + str(args[0] if args else "?") + "\\n")
    sys.stderr.flush()
    os._exit(97)


info.get_pep517_metadata = metadata_without_building
info.isolated_builder = isolated_build.isolated_builder = no_isolated_build

from poetry.console.application import main  # noqa: E402

# The solver makes millions of short-lived marker objects: at CPython's default thresholds a one-pin lock of
# sd-demo ran ~770 young and 6 full collections of the whole heap (about a tenth of its CPU). What poetry
# imported is frozen (never scanned again) and the young generation collected every 50,000 allocations: the
# same lock, byte for byte, sooner.
import gc  # noqa: E402

gc.freeze()
gc.set_threshold(50_000, 20, 100)
sys.argv[0] = "poetry"
sys.exit(main())
"""


def solver_error(ctx: Context, spec: MethodSpec, lines: list[str]) -> EnvmgrError | None:
    """Poetry's own explanation of a failed lock (`Because ... version solving failed.`), without the deprecation
    text of setuptools and poetry around it; None when poetry printed nothing but noise."""
    meaningful = [line.strip() for line in lines if line.strip() and not _NOISE.search(line)]
    if not meaningful:
        return None
    start = next((i for i, line in enumerate(meaningful) if line.startswith("Because ")), None)
    if start is not None:
        end = next((i for i in range(start, len(meaningful)) if "version solving failed" in meaningful[i]),
                   len(meaningful) - 1)
        reason = " ".join(meaningful[start:end + 1])
    else:
        reason = " | ".join(meaningful[-3:])
    reason = ctx.ui.redact(reason)[-900:]
    if _LOCAL_LABEL.search(reason):
        hint = ("a local version (+cu124, +cpu) exists only on the index that serves it: map that index to a "
                "mirror ([adapt] sources = { NAME = \"mirror\" } with [mirrors] sources.NAME), or pin the public "
                "version in [adapt] pin")
    else:
        hint = (f"pin or drop the package it names in {spec.folder / 'envmgr.toml'} [adapt], then "
                f"`envmgr lock {spec.name}`")
    return EnvmgrError(f"locking {spec.name}: poetry found no solution: {reason}", hint=hint)


def _refuse_sdist_only(spec: MethodSpec, lock: dict) -> None:
    """A locked package with no wheel at all (poetry read its sdist's static metadata) is refused at lock time,
    unless the method allows building it: installing is wheels only."""
    allowed = {canonicalize_name(name) for name in spec.adapt.build_from_source}
    refused: dict[str, str] = {}
    for package in lock.get("package", []):
        files = [f.get("file", "") for f in package.get("files", [])]
        if files and not any(name.endswith(".whl") for name in files) \
                and canonicalize_name(package["name"]) not in allowed:
            refused[package["name"]] = package["version"]
    if refused:   # every one in one message: the lock names them all
        raise sdist_only_error(f"locking {spec.name}", refused, spec.adapt)


class PoetryBackend:
    name = "poetry"
    env_file = PYPROJECT
    layered = True

    def __init__(self) -> None:
        # (path, text, parsed) of the lock `lock` wrote last: `check` reads the file and reuses the parse of
        # the same text (only `check` reads it, and never changes it)
        self._written: tuple[Path, str, dict] | None = None

    # ------------------------------------------------------------------ detecting

    def detect(self, root: Path, pyproject: dict) -> Evidence | None:
        """A pyproject.toml with a [tool.poetry] table, a poetry.lock beside it, or static [project] dependencies."""
        if not pyproject:
            return None
        has_lock = (root / LOCK).is_file()
        if "poetry" in pyproject.get("tool", {}) or has_lock or pyproject.get("project", {}).get("dependencies"):
            return Evidence(PYPROJECT + (f" + {LOCK}" if has_lock else ""))
        return None

    def refuse_over(self, root: Path, pyproject: dict, others: list[str]) -> None:
        """A requirements.txt naming what pyproject.toml does not: poetry winning would silently drop it."""
        if "pip" not in others:
            return
        extra = requirement_names(root / "requirements.txt") - pyproject_names(pyproject)
        if extra:
            raise UsageError(f"{root}: pyproject.toml and requirements.txt disagree (requirements.txt also has "
                             f"{', '.join(sorted(extra)[:5])}); poetry would win",
                             hint="choose one with --backend poetry or --backend pip")

    def lock_files(self, spec: MethodSpec) -> list[Path]:
        return [spec.lock_path / LOCK]

    # ------------------------------------------------------------------ reading

    def _source_pyproject(self, spec: MethodSpec) -> dict:
        path = spec.source_path / PYPROJECT
        if not path.is_file():
            raise UsageError(f"{path}: missing (a poetry method needs pyproject.toml)")
        try:
            return tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise UsageError(f"{path}: not valid TOML: {exc}") from None

    def _pyproject(self, spec: MethodSpec, mirror_urls: dict[str, str] | None = None) -> dict:
        """The effective pyproject: the method's own with the spec's [adapt] applied."""
        data = self._source_pyproject(spec)
        if spec.adapt.is_empty() and not mirror_urls:
            return data
        return adapt_pyproject(data, spec.adapt, spec.folder / "envmgr.toml", mirror_urls)

    def _mapped_indexes(self, ctx: Context, spec: MethodSpec) -> dict[str, str]:
        """Declared indexes mapped to a site mirror: name -> mirror URL (used at lock and install time only)."""
        return {name: ctx.config.mirrors.sources[name] for name, target in spec.adapt.sources.items()
                if target == "mirror" and name in ctx.config.mirrors.sources}

    def _lock_data(self, spec: MethodSpec) -> dict:
        path = spec.lock_path / LOCK
        if not path.is_file():
            raise missing_lock(spec, LOCK)
        return self._parse_lock(spec, path, path.read_text(encoding="utf-8"))

    @staticmethod
    def _parse_lock(spec: MethodSpec, path: Path, text: str) -> dict:
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise StaleLockError(f"{path}: not a valid lock: {exc}", hint=f"run `envmgr lock {spec.name}`") from None

    def _checked_lock_data(self, spec: MethodSpec) -> dict:
        """The lock as `check` reads it from disk; parsed again only when its text is not the one `lock` just
        parsed and wrote (a 300 kB lock takes ~50 ms to parse: the check after each lock paid it twice)."""
        path = spec.lock_path / LOCK
        if not path.is_file():
            raise missing_lock(spec, LOCK)
        text = path.read_text(encoding="utf-8")
        written = self._written
        if written is not None and written[0] == path and written[1] == text:
            return written[2]
        return self._parse_lock(spec, path, text)

    def check(self, spec: MethodSpec) -> None:
        lock = self._checked_lock_data(spec)
        expected = content_hash(self._pyproject(spec))
        recorded = lock.get("metadata", {}).get("content-hash")
        if recorded != expected:
            raise StaleLockError(f"{spec.name}: {LOCK} does not match {PYPROJECT} (it changed since the last lock)",
                                 hint=f"run `envmgr lock {spec.name}`")

    def packages(self, spec: MethodSpec, base: BaseImage) -> list[dict]:
        """The locked packages that the target installs (main group, markers true for the target)."""
        return select(self._lock_data(spec), self._pyproject(spec), target_environment(base, spec),
                      str(spec.lock_path / LOCK))

    def requirement_entries(self, spec: MethodSpec, base: BaseImage) -> list[str]:
        """One exact, hashed requirement per locked distribution the target installs."""
        entries = []
        unreachable = []
        for package in self.packages(spec, base):
            source = package.get("source", {})
            if source.get("type") in ("git", "url", "file", "directory"):
                unreachable.append(f"{package['name']} ({source.get('type')})")
                continue
            hashes = [f["hash"] for f in package.get("files", []) if f.get("hash")]
            if not hashes:
                raise StaleLockError(f"{spec.lock_path / LOCK}: package {package['name']} has no file hashes",
                                     hint=f"run `envmgr lock {spec.name}`")
            entries.append(f"{package['name']}=={package['version']} \\\n"
                           + " \\\n".join(f"    --hash={h}" for h in sorted(hashes)))
        if unreachable:
            raise UsageError(f"{spec.name}: dependencies that cannot be installed from an index: "
                             + ", ".join(unreachable))
        return entries

    def requirements(self, spec: MethodSpec, base: BaseImage) -> str:
        return "\n".join(self.requirement_entries(spec, base)) + "\n"

    def layer_entries(self, ctx: Context, spec: MethodSpec, base: BaseImage) -> tuple[list[str], list[str]]:
        """(one requirement per distribution, mirrors of declared indexes): what build installs unit by unit."""
        return source_builds.with_built_wheels(ctx, spec, base, self.requirement_entries(spec, base),
                                               list(self._mapped_indexes(ctx, spec).values()))

    def entry_prefix(self, spec: MethodSpec) -> list[str]:
        return []       # the venv's interpreter is on PATH: nothing to activate

    def lock_file_hashes(self, spec: MethodSpec) -> dict[str, list[str]]:
        return file_hashes(spec.lock_path / LOCK)

    def summary(self, spec: MethodSpec) -> dict:
        try:
            lock = self._lock_data(spec)
        except StaleLockError:
            return {"lock": None}
        packages = lock.get("package", [])
        return {"lock": str(spec.lock_path / LOCK), "packages": len(packages), "adaptations": spec.adapt.describe(),
                "pins": {p["name"]: p["version"] for p in packages}}

    # ------------------------------------------------------------------ locking

    def _tools(self, ctx: Context, base: BaseImage) -> Path:
        """A venv with the pinned poetry and its PyPI-mirror plugin, made once per base image, its bytecode compiled.

        The lock step mounts it read-only and runs poetry with -B: without the .pyc files written here, every
        lock compiled poetry's ~500 modules again (measured 1.5-3 s a lock on this machine)."""
        name = f"poetry-{POETRY_VERSION}-mirror-{PYPI_MIRROR_PLUGIN_VERSION}-{base.diff_id.split(':')[1][:12]}"
        root = ctx.store_dir / "tools"
        root.mkdir(parents=True, exist_ok=True)
        done, compiled = root / name / ".complete", root / name / TOOLS_BYTECODE
        if done.exists() and compiled.exists():
            return root / name
        prefix = f"{paths.CONTAINER_TOOLS_DIR}/poetry"
        with open_lock(root / f"{name}.lock") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            if done.exists() and compiled.exists():
                return root / name
            if done.exists():   # made before its bytecode was: compiled once, in place (a lock may be reading it)
                with ctx.ui.progress("compiling the lock tools' bytecode (once per base image)", total=1,
                                     unit="steps") as task:
                    run_step(ctx, base, "compiling poetry's bytecode",
                             f"{prefix}/bin/python -m compileall -q -j 0 {prefix}/lib >/dev/null",
                             [BindMount(root / name, prefix, read_only=False)], {})
                    task.advance(1)
                compiled.touch()
                return root / name
            shutil.rmtree(root / name, ignore_errors=True)
            (root / name).mkdir()
            script = "\n".join([
                f"{paths.CONTAINER_UV} venv --quiet --python {base.python} {prefix}",
                f"{paths.CONTAINER_UV} pip install --quiet --compile-bytecode --python {prefix}/bin/python "
                f"poetry=={POETRY_VERSION} poetry-plugin-pypi-mirror=={PYPI_MIRROR_PLUGIN_VERSION}",
            ])
            with ctx.ui.progress(f"installing poetry {POETRY_VERSION} for locking (once per base image)",
                                 total=1, unit="steps") as task:
                run_step(ctx, base, "installing poetry", script,
                         [BindMount(root / name, prefix, read_only=False), *uv_mounts(ctx)], uv_step_env(ctx))
                task.advance(1)
            compiled.touch()
            done.touch()
        return root / name

    def _repository_lock(self, spec: MethodSpec) -> dict | None:
        """The method's own poetry.lock (what its authors tested), when envmgr writes its lock elsewhere."""
        path = spec.source_path / LOCK
        if spec.lock_path == spec.source_path or not path.is_file():
            return None
        try:
            return tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise UsageError(f"{path}: the method's own lock is not valid TOML: {exc}",
                             hint="fix or remove it; envmgr starts from it") from None

    def drift(self, spec: MethodSpec) -> list[dict[str, str | None]] | None:
        """What envmgr's lock changed against the repository's own (None: the method has no lock of its own)."""
        theirs = self._repository_lock(spec)
        if theirs is None or not (spec.lock_path / LOCK).is_file():
            return None
        return lock_drift(theirs, self._lock_data(spec))

    def seeded_from(self, spec: MethodSpec) -> None:
        return None     # a repository's own poetry.lock seeds the solve, but it is the method's lock, not a pins file

    def lock(self, ctx: Context, spec: MethodSpec, base: BaseImage, regenerate: bool = False) -> list[Path]:
        source = self._source_pyproject(spec)
        theirs = self._repository_lock(spec)
        raise_if_unreachable(spec.name, unreachable_in_pyproject(source, spec.adapt, ctx.config.mirrors.sources,
                                                                 locked_versions(theirs) if theirs else None))
        canonical = self._pyproject(spec)
        mapped = self._mapped_indexes(ctx, spec)
        previous = spec.lock_path / LOCK
        # the seed poetry keeps every version of that it may: envmgr's previous lock, else the repository's own
        # (--regenerate forgets envmgr's; only a method without a lock of its own is solved from nothing)
        seed: dict | None = None
        pins: dict[str, str] = {}
        if theirs is not None:
            seed, pins = seed_lock(theirs, source, spec.adapt, mapped)
        if previous.is_file() and not regenerate and spec.lock_path != spec.source_path:
            seed = seed_lock(self._lock_data(spec), source, spec.adapt, mapped)[0]
        pins = {name: version for name, version in pins.items()
                if name not in {canonicalize_name(n) for n in [*spec.adapt.pin, *spec.adapt.drop]}}
        if pins or mapped:
            # what poetry solves: the adaptation, the repository's versions of packages of an index mapped to
            # the default (public labels), mapped indexes pointing to their mirrors
            adapt = spec.adapt.model_copy(update={"pin": {**pins, **spec.adapt.pin}})
            for_lock = adapt_pyproject(source, adapt, spec.folder / "envmgr.toml", mapped)
        else:
            for_lock = canonical
        tools = self._tools(ctx, base)
        work_root = ctx.cache_dir / "work"
        work_root.mkdir(parents=True, exist_ok=True)
        spec.lock_path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=work_root, prefix=f"lock-{spec.name}-") as work:
            (Path(work) / PYPROJECT).write_text(tomli_w.dumps(for_lock))
            fresh = regenerate and seed is None
            if seed is not None:
                (Path(work) / LOCK).write_text(tomli_w.dumps(seed))
            elif previous.is_file() and not regenerate:
                shutil.copy2(previous, Path(work) / LOCK)
            # poetry's cache records file URLs as the mirror gave them, credentials included: with a
            # mirror URL that carries a password, the cache lives only as long as this lock
            poetry_cache = Path(work) / "poetry-cache" if ctx.config.secrets() else ctx.cache_dir / "poetry"
            poetry_cache.mkdir(parents=True, exist_ok=True)
            # no keyring: the box has none (credentials come as a netrc), and probing for one costs each lock time
            env = {**poetry_env(ctx.config.mirrors), "POETRY_CACHE_DIR": f"{paths.CONTAINER_CACHE}/poetry",
                   "POETRY_KEYRING_ENABLED": "false",
                   "PYTHONWARNINGS": "ignore::DeprecationWarning", "ENVMGR_BUILT": f"{paths.CONTAINER_WORK}/built"}
            (Path(work) / "wheels_only_poetry.py").write_text(WHEELS_ONLY_POETRY)
            built = source_builds.build_for_lock(ctx, spec, base, list(mapped.values()))
            if built:   # poetry reads their metadata from the wheels built in the box
                source_builds.stage_for_lock(built, Path(work) / "built")
            command = (f"{paths.CONTAINER_TOOLS_DIR}/poetry/bin/python -B {paths.CONTAINER_WORK}/wheels_only_poetry.py"
                       " lock" + (" --regenerate" if fresh else ""))
            output: list[str] = []
            with ctx.ui.progress(f"locking {spec.name} with poetry {POETRY_VERSION} in {base.tag}",
                                 total=1, unit="steps") as task:
                try:
                    run_step(ctx, base, f"locking {spec.name}", command,
                             [BindMount(tools, f"{paths.CONTAINER_TOOLS_DIR}/poetry", read_only=True),
                              BindMount(Path(work), paths.CONTAINER_WORK, read_only=False),
                              BindMount(poetry_cache, f"{paths.CONTAINER_CACHE}/poetry", read_only=False)],
                             env, workdir=paths.CONTAINER_WORK, on_line=output.append, method=spec.name)
                except MirrorError:
                    raise
                except EnvmgrError as exc:
                    sdist = next((line.split(SDIST_MARK, 1)[1].strip() for line in output if SDIST_MARK in line), None)
                    if sdist is not None:
                        raise sdist_only_error(f"locking {spec.name}", {sdist: ""}, spec.adapt) from None
                    raise solver_error(ctx, spec, output) or exc from None
                task.advance(1)
            # parsed once, as written (putting the declared index URLs back changes no package nor file name)
            text = self._unmirror((Path(work) / LOCK).read_text(encoding="utf-8"), source, mapped, canonical)
            parsed = tomllib.loads(text)
            _refuse_sdist_only(spec, parsed)
            leaked = [host for host in mirror_hosts(ctx.config.mirrors) if host in text]
            if leaked:
                raise EnvmgrError(f"{spec.name}: poetry recorded a mirror in the lock; it was not written",
                                  hint="a [[tool.poetry.source]] in pyproject.toml may name the mirror: remove it")
            written = []
            if spec.lock_path != spec.source_path:
                # the effective manifest beside the lock: what was locked, for people and `poetry check`
                atomic_write(spec.lock_path / PYPROJECT, tomli_w.dumps(canonical))
                written.append(spec.lock_path / PYPROJECT)
            atomic_write(spec.lock_path / LOCK, text)
            self._written = (spec.lock_path / LOCK, text, parsed)
            written.append(spec.lock_path / LOCK)
        return written[::-1]

    @staticmethod
    def _unmirror(text: str, source: dict, mapped: dict[str, str], canonical: dict) -> str:
        """Put the declared index URLs back where poetry recorded the mirror, and the mirror-free hash."""
        declared = {s.get("name"): s.get("url") for s in source.get("tool", {}).get("poetry", {}).get("source", [])}
        for name, mirror in mapped.items():
            if declared.get(name):
                text = text.replace(f'url = "{mirror}"', f'url = "{declared[name]}"')
                text = text.replace(f'url = "{mirror.rstrip("/")}"', f'url = "{declared[name]}"')
        return re.sub(r'^content-hash = "[0-9a-f]+"$', f'content-hash = "{content_hash(canonical)}"', text,
                      count=1, flags=re.M)

    # ------------------------------------------------------------------ installing

    def install(self, ctx: Context, spec: MethodSpec, base: BaseImage, prefix: Path) -> None:
        requirements = self.requirements(spec, base)
        extra = list(self._mapped_indexes(ctx, spec).values())
        count = requirements.count("==")
        work_root = ctx.cache_dir / "work"
        work_root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=work_root, prefix=f"install-{spec.name}-") as work:
            (Path(work) / "requirements.txt").write_text(requirements)
            script = install_requirements_script(base, spec.env_prefix, f"{paths.CONTAINER_WORK}/requirements.txt")
            with ctx.ui.progress(f"installing {count} locked packages into {spec.env_prefix}",
                                 total=count, unit="packages") as task:
                def on_line(line: str) -> None:
                    if line.strip().startswith("+ "):
                        task.advance(1)

                run_step(ctx, base, f"installing {spec.name}'s environment", script,
                         [BindMount(prefix, spec.env_prefix, read_only=False),
                          BindMount(Path(work), paths.CONTAINER_WORK, read_only=True), *uv_mounts(ctx)],
                         uv_step_env(ctx, extra), on_line=on_line, method=spec.name)


