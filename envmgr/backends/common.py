"""What the backends share: running a step in a container of the method's base image, and uv."""

from __future__ import annotations

import os
import re
from pathlib import Path

from .. import paths
from ..base import BaseImage
from ..containers import BindMount, ContainerSpec
from ..context import Context
from ..errors import EnvmgrError, MirrorError
from ..mirrors import ca_mounts, uv_env

_MIRROR_FAILURES = re.compile(r"(Connection refused|connection error|Failed to fetch|failed to connect|"
                              r"dns error|Could not connect|ConnectError|Max retries exceeded|"
                              r"401 Unauthorized|403 Forbidden|timed out|tcp connect error)", re.I)
_BUILD_FAILURE = re.compile(r"Failed to (?:build|download and build|prepare distributions).*?`([^`]+)`")
_BUILD_CALL = re.compile(r"Call to `([^`]+)` failed")
_NO_WHEEL = re.compile(r"Distribution `([^`@ ]+)[^`]*` can't be installed because it doesn't have a source "
                       r"distribution or wheel for the current platform")
_HASH_FAILURES = re.compile(r"(hash mismatch|Hash mismatch|do not match the hashes|THESE PACKAGES DO NOT MATCH)", re.I)


def run_step(ctx: Context, base: BaseImage, step: str, script: str, mounts: list[BindMount],
             env: dict[str, str], workdir: str | None = None, on_line=None, method: str = "") -> list[str]:
    """Run `script` (sh) in a container of the base image with host networking, as the invoking user.

    Host networking lets a mirror on the host's loopback answer, as `docker build --network=host`
    does. Returns the output lines; raises with the last lines (redacted) when the step fails.
    """
    lines: list[str] = []

    def collect(line: str) -> None:
        lines.append(line)
        ctx.ui.log(line)
        if on_line:
            on_line(line)

    spec = ContainerSpec(
        image=base.image_id, command=["/bin/sh", "-ec", script], env={"HOME": "/tmp", **env},
        mounts=mounts + ca_mounts(ctx.config.mirrors), workdir=workdir, user=f"{os.getuid()}:{os.getgid()}",
        network="host", labels={paths.LABEL_KIND: "step", paths.LABEL_METHOD: method},
    )
    code = ctx.engine.run(spec, on_line=collect).exit_code
    if code != 0:
        tail = [line for line in lines if line.strip()][-6:]
        detail = ctx.ui.redact(" | ".join(t.strip() for t in tail))[-900:]
        text = "\n".join(lines)
        no_wheel = _NO_WHEEL.search(text)
        if no_wheel:
            raise EnvmgrError(f"{step}: {no_wheel.group(1)} has no wheel (and no sdist) for the target "
                              f"(linux, Python of {base.tag})",
                              hint="pin a version that ships one, or drop it in the method's [adapt]")
        build_failed = _BUILD_FAILURE.search(text)
        if build_failed:
            call = _BUILD_CALL.search(text)
            what = f"`{call.group(1)}`" if call else "building it from its sdist"
            raise EnvmgrError(f"{step}: {build_failed.group(1)} failed while {what}: {detail}",
                              hint="it has no wheel for the target and needs build-time dependencies (torch, a "
                                   "compiler): pin a version with a wheel, or drop it in the method's [adapt]")
        if _HASH_FAILURES.search(text):
            raise MirrorError(f"{step}: a downloaded file does not match the hash in the lock: {detail}",
                              hint="the mirror serves a different file than the one locked; nothing was tagged")
        if _MIRROR_FAILURES.search(text):
            raise MirrorError(f"{step}: a mirror did not answer: {detail}",
                              hint="check the mirrors `envmgr doctor` shows")
        raise EnvmgrError(f"{step} failed (exit {code}): {detail}")
    return lines


def uv_mounts(ctx: Context) -> list[BindMount]:
    uv_cache = ctx.cache_dir / "uv"
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

    Each top-level entry is compiled by a fresh interpreter with a fixed hash seed: marshal's output
    depends on what the process compiled before, so one process per entry gives the same bytes
    whatever the scheduling. -B: a .pth import at start-up (setuptools' _distutils_hack) must not
    leave a timestamped pyc; -f: rewrite every pyc. A deliberately broken file must not fail the build.
    """
    return [
        f"site=$({python} -B -c 'import sysconfig; print(sysconfig.get_paths()[\"purelib\"])')",
        f"cd \"$site\" && find . -mindepth 1 -maxdepth 1 -print0 | LC_ALL=C sort -z | xargs -0 -r -n 1 "
        f"-P \"$(nproc)\" env PYTHONHASHSEED=0 {python} -B -m compileall -f -q --invalidation-mode unchecked-hash "
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
