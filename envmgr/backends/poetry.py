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
import shutil
import tempfile
import tomllib
from pathlib import Path

from .. import paths
from ..base import BaseImage
from ..context import Context
from ..engine import BindMount
from ..errors import EnvmgrError, StaleLockError, UsageError
from ..mirrors import mirror_hosts, poetry_env
from ..spec import MethodSpec
from .poetry_lock import select
from .common import install_requirements_script, run_step, uv_mounts, uv_step_env

POETRY_VERSION = "2.5.1"
PYPI_MIRROR_PLUGIN_VERSION = "0.6.5"
LOCK = "poetry.lock"
PYPROJECT = "pyproject.toml"

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


class PoetryBackend:
    name = "poetry"

    def lock_files(self, spec: MethodSpec) -> list[Path]:
        return [spec.folder / LOCK]

    # ------------------------------------------------------------------ reading

    def _pyproject(self, spec: MethodSpec) -> dict:
        path = spec.folder / PYPROJECT
        if not path.is_file():
            raise UsageError(f"{path}: missing (a poetry method needs pyproject.toml)")
        try:
            return tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise UsageError(f"{path}: not valid TOML: {exc}") from None

    def _lock_data(self, spec: MethodSpec) -> dict:
        path = spec.folder / LOCK
        if not path.is_file():
            raise StaleLockError(f"{spec.name}: no {LOCK} yet", hint=f"run `envmgr lock {spec.name}`")
        try:
            return tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise StaleLockError(f"{path}: not a valid lock: {exc}", hint=f"run `envmgr lock {spec.name}`") from None

    def check(self, spec: MethodSpec) -> None:
        lock = self._lock_data(spec)
        expected = content_hash(self._pyproject(spec))
        recorded = lock.get("metadata", {}).get("content-hash")
        if recorded != expected:
            raise StaleLockError(f"{spec.name}: {LOCK} does not match {PYPROJECT} (it changed since the last lock)",
                                 hint=f"run `envmgr lock {spec.name}`")

    def packages(self, spec: MethodSpec, base: BaseImage) -> list[dict]:
        """The locked packages that the target installs (main group, markers true for the target)."""
        return select(self._lock_data(spec), self._pyproject(spec), target_environment(base, spec),
                      str(spec.folder / LOCK))

    def requirements(self, spec: MethodSpec, base: BaseImage) -> str:
        lines = []
        unreachable = []
        for package in self.packages(spec, base):
            source = package.get("source", {})
            if source.get("type") in ("git", "url", "file", "directory"):
                unreachable.append(f"{package['name']} ({source.get('type')})")
                continue
            hashes = [f["hash"] for f in package.get("files", []) if f.get("hash")]
            if not hashes:
                raise StaleLockError(f"{spec.folder / LOCK}: package {package['name']} has no file hashes",
                                     hint=f"run `envmgr lock {spec.name}`")
            lines.append(f"{package['name']}=={package['version']} \\\n"
                         + " \\\n".join(f"    --hash={h}" for h in sorted(hashes)))
        if unreachable:
            raise UsageError(f"{spec.name}: dependencies that cannot be installed from an index: "
                             + ", ".join(unreachable))
        return "\n".join(lines) + "\n"

    def summary(self, spec: MethodSpec) -> dict:
        try:
            lock = self._lock_data(spec)
        except StaleLockError:
            return {"lock": None}
        packages = lock.get("package", [])
        return {"lock": str(spec.folder / LOCK), "packages": len(packages),
                "pins": {p["name"]: p["version"] for p in packages}}

    # ------------------------------------------------------------------ locking

    def _tools(self, ctx: Context, base: BaseImage) -> Path:
        """A venv with the pinned poetry and its PyPI-mirror plugin, made once per base image."""
        name = f"poetry-{POETRY_VERSION}-mirror-{PYPI_MIRROR_PLUGIN_VERSION}-{base.diff_id.split(':')[1][:12]}"
        root = ctx.store_dir / "tools"
        root.mkdir(parents=True, exist_ok=True)
        done = root / name / ".complete"
        if done.exists():
            return root / name
        with open(root / f"{name}.lock", "w") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            if done.exists():
                return root / name
            shutil.rmtree(root / name, ignore_errors=True)
            (root / name).mkdir()
            prefix = f"{paths.CONTAINER_TOOLS_DIR}/poetry"
            script = "\n".join([
                f"{paths.CONTAINER_UV} venv --quiet --python {base.python} {prefix}",
                f"{paths.CONTAINER_UV} pip install --quiet --python {prefix}/bin/python "
                f"poetry=={POETRY_VERSION} poetry-plugin-pypi-mirror=={PYPI_MIRROR_PLUGIN_VERSION}",
            ])
            with ctx.ui.progress(f"installing poetry {POETRY_VERSION} for locking (once per base image)",
                                 total=1, unit="steps") as task:
                run_step(ctx, base, "installing poetry", script,
                         [BindMount(root / name, prefix, read_only=False), *uv_mounts(ctx)], uv_step_env(ctx))
                task.advance(1)
            done.touch()
        return root / name

    def lock(self, ctx: Context, spec: MethodSpec, base: BaseImage, regenerate: bool = False) -> list[Path]:
        self._pyproject(spec)
        tools = self._tools(ctx, base)
        work_root = ctx.cache_dir / "work"
        work_root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=work_root, prefix=f"lock-{spec.name}-") as work:
            shutil.copy2(spec.folder / PYPROJECT, Path(work) / PYPROJECT)
            if (spec.folder / LOCK).is_file() and not regenerate:
                shutil.copy2(spec.folder / LOCK, Path(work) / LOCK)
            poetry_cache = ctx.cache_dir / "poetry"
            poetry_cache.mkdir(parents=True, exist_ok=True)
            env = {**poetry_env(ctx.config.mirrors), "POETRY_CACHE_DIR": f"{paths.CONTAINER_CACHE}/poetry"}
            command = f"{paths.CONTAINER_TOOLS_DIR}/poetry/bin/poetry lock" + (" --regenerate" if regenerate else "")
            resolved = [0]

            def on_line(line: str) -> None:
                if "Resolving dependencies" in line:
                    resolved[0] += 1

            with ctx.ui.progress(f"locking {spec.name} with poetry {POETRY_VERSION} in {base.tag}",
                                 total=1, unit="steps") as task:
                run_step(ctx, base, f"locking {spec.name}", command,
                         [BindMount(tools, f"{paths.CONTAINER_TOOLS_DIR}/poetry", read_only=True),
                          BindMount(Path(work), paths.CONTAINER_WORK, read_only=False),
                          BindMount(poetry_cache, f"{paths.CONTAINER_CACHE}/poetry", read_only=False)],
                         env, workdir=paths.CONTAINER_WORK, on_line=on_line, method=spec.name)
                task.advance(1)
            written = Path(work) / LOCK
            text = written.read_text(encoding="utf-8")
            leaked = [host for host in mirror_hosts(ctx.config.mirrors) if host in text]
            if leaked:
                raise EnvmgrError(f"{spec.name}: poetry recorded a mirror in the lock; it was not written",
                                  hint="a [[tool.poetry.source]] in pyproject.toml may name the mirror: remove it")
            target = spec.folder / LOCK
            tmp = target.with_name(LOCK + ".envmgr-tmp")
            shutil.copyfile(written, tmp)
            tmp.replace(target)
        return [target]

    # ------------------------------------------------------------------ installing

    def install(self, ctx: Context, spec: MethodSpec, base: BaseImage, prefix: Path) -> None:
        requirements = self.requirements(spec, base)
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
                         uv_step_env(ctx), on_line=on_line, method=spec.name)
