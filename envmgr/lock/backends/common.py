"""What the backends share: describing a step in a container of the method's base image, and uv."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from envmgr.core import paths
from envmgr.core.errors import StaleLockError
from envmgr.core.spec import MethodSpec
from envmgr.door.containers import BindMount
from envmgr.door.context import Context
from envmgr.door.mirrors import ca_mounts, uv_env
from envmgr.door.steps import Step
from envmgr.images.base import BaseImage
from envmgr.lock.uv_cache import shared_uv_cache, uv_cache_dir


def describe_step(ctx: Context, base: BaseImage, title: str, script: str, mounts: list[BindMount],
                  env: dict[str, str], workdir: str | None = None, method: str = "") -> Step:
    """A step in a container of `base`: HOME in /tmp, the site's CA bundle mounted when it has one."""
    return Step(title=title, image=base.image_id, script=script, mounts=mounts + ca_mounts(ctx.config.mirrors),
                env={"HOME": "/tmp", **env}, workdir=workdir, method=method, target=base.tag)


def run_step(ctx: Context, base: BaseImage, step: str, script: str, mounts: list[BindMount],
             env: dict[str, str], workdir: str | None = None, on_line: Callable[[str], None] | None = None,
             method: str = "") -> list[str]:
    """Describe the step and hand it to the context's step runner (the build layer's, or a test's).

    A step that mounts the uv cache holds it shared while it runs (see envmgr.lock.uv_cache).
    """
    described = describe_step(ctx, base, step, script, mounts, env, workdir, method)
    if not any(mount.source == uv_cache_dir(ctx.cache_dir) for mount in mounts):
        return ctx.step_runner(ctx, described, on_line)
    with shared_uv_cache(ctx.cache_dir):
        return ctx.step_runner(ctx, described, on_line)


def missing_lock(spec: MethodSpec, lock_name: str) -> StaleLockError:
    """The error every backend gives when a method has no lock yet (exit 3, with the command to make one)."""
    return StaleLockError(f"{spec.name}: no {lock_name} yet", hint=f"run `envmgr lock {spec.name}`")


def uv_mounts(ctx: Context) -> list[BindMount]:
    uv_cache = uv_cache_dir(ctx.cache_dir)
    uv_cache.mkdir(parents=True, exist_ok=True)
    return [BindMount(ctx.uv_binary(), paths.CONTAINER_UV, read_only=True),
            BindMount(uv_cache, f"{paths.CONTAINER_CACHE}/uv", read_only=False)]


def uv_step_env(ctx: Context, extra_indexes: list[str] | None = None) -> dict[str, str]:
    """uv's environment; `extra_indexes` are mirrors of indexes a method declares (mapped in its [adapt])."""
    env = {**uv_env(ctx.config.mirrors), "UV_CACHE_DIR": f"{paths.CONTAINER_CACHE}/uv"}
    if extra_indexes:
        env["UV_INDEX"] = " ".join([*extra_indexes, *env.get("UV_INDEX", "").split()])
        env["UV_INDEX_STRATEGY"] = "unsafe-best-match"   # hashes are required: any index may serve a pin
    return env


def compile_bytecode_script(python: str) -> list[str]:
    """Compile site-packages to unchecked-hash pycs (no source mtimes inside), reproducibly and in parallel.

    Each top-level entry is compiled by a fresh interpreter with a fixed hash seed, so the bytes are the
    same whatever the scheduling (measured on the base's Python 3.11 with -S: a pyc does not depend on
    what the process compiled before; fresh processes keep that true should an interpreter differ).
    -S: no site, so no installed package's .pth runs (package code, in a step with the mirror credentials);
    -B: nothing leaves a timestamped pyc; -f: rewrite every pyc. A deliberately broken file must not fail the build.
    """
    return [
        # the environment's site-packages from its layout (with -S a venv's interpreter does not know its venv)
        f"site=\"$(dirname \"$(dirname {python})\")/lib/$({python} -S -B -c "
        f"'import sys; print(\"python%d.%d\" % sys.version_info[:2])')/site-packages\"",
        f"cd \"$site\" && find . -mindepth 1 -maxdepth 1 -print0 | LC_ALL=C sort -z | xargs -0 -r -n 1 "
        f"-P \"$(nproc)\" env PYTHONHASHSEED=0 {python} -S -B -m compileall -f -q --invalidation-mode unchecked-hash "
        f">/dev/null || true",
        "cd /",
    ]


def install_requirements_script(base: BaseImage, prefix: str, requirements: str) -> str:
    """Create the venv, install exact hashed pins without resolving, compile bytecode reproducibly."""
    uv = paths.CONTAINER_UV
    return "\n".join([
        f"{uv} venv --quiet --allow-existing --python {base.python} {prefix}",
        f"{uv} pip install --python {prefix}/bin/python --require-hashes --no-deps --strict -r {requirements}",
        *compile_bytecode_script(f"{prefix}/bin/python"),
    ])


def safe_remove_tree(path: Path) -> None:
    import shutil

    if path.exists():
        shutil.rmtree(path, ignore_errors=True)


def requirement_names(path: Path) -> set[str]:
    """The normalized names a requirements file asks for (options, comments and unparsable lines skipped)."""
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


def split_requirements(text: str) -> list[str]:
    """A hashed requirements file cut into one entry per distribution (continuation lines kept together)."""
    entries: list[str] = []
    current: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or (stripped.startswith("#") and not current):
            continue
        if stripped.startswith("#"):
            continue
        if not current and stripped.startswith("-"):
            continue   # options (--index-url etc.) never reach a lock envmgr writes; ignore them here
        current.append(line)
        if not stripped.endswith("\\"):
            entries.append("\n".join(current))
            current = []
    if current:
        entries.append("\n".join(current))
    return entries
