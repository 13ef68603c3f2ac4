"""The one step runner: a step a backend describes (lock, install) run in a container through the engine.

Backends say what to run (`Step`: script, mounts, env, network, image); this module runs it with
host networking, so a mirror on the host's loopback answers as with `docker build --network=host`,
as the invoking user, and turns a failure into one line that says what failed and what to do.

Every step's uv is wheels-only (UV_CONFIG_FILE names a mounted `[pip] no-build = true`): a step that
downloads, with the network and the mirror credentials, never runs a package's build backend. A
source distribution is built only in a step of its own (envmgr/lock/backends/source_builds.py): no network,
no credentials, nothing shared mounted writable, as an unprivileged user.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol
from urllib.parse import unquote, urlsplit

from packaging.utils import canonicalize_name

from envmgr.core import paths
from envmgr.core.credentials import strip_credentials
from envmgr.core.errors import EnvmgrError, MirrorError
from envmgr.door.containers import BindMount, ContainerSpec
from envmgr.door.logs import uncaught_traceback

if TYPE_CHECKING:
    from envmgr.core.spec import Adaptations
    from envmgr.door.context import Context

_MIRROR_FAILURES = re.compile(r"(Connection refused|connection error|Failed to fetch|failed to connect|"
                              r"dns error|Could not connect|ConnectError|Max retries exceeded|"
                              r"401 Unauthorized|403 Forbidden|timed out|tcp connect error)", re.I)
_BUILD_FAILURE = re.compile(r"Failed to (?:build|download and build|prepare distributions).*?`([^`]+)`")
_BUILD_CALL = re.compile(r"Call to `([^`]+)` failed")
_NO_WHEEL = re.compile(r"Distribution `([^`@ ]+)[^`]*` can't be installed because it doesn't have a source "
                       r"distribution or wheel for the current platform")
# uv, wheels only, on a pin that has none for the target (`Because NAME==V has no usable wheels ...`)
SDIST_ONLY = re.compile(r"(?<![A-Za-z0-9._<>=!~-])([A-Za-z0-9][A-Za-z0-9._-]*)(?:([=<>!~]=?)([^ ,]*))? "
                        r"has no usable wheels")
# the newest version uv saw of a package (`only NAME<=V is available`, `NAME==V has no usable wheels`)
_SDIST_VERSION = r"(?:only {name}(?:==|<=)([^ ,]+) is available|{name}==([^ ,]+) has no usable wheels)"
WHEELS_ONLY = Path(__file__).parent.parent / "data" / "uv-wheels-only.toml"
CONTAINER_UV_CONFIG = "/opt/envmgr/uv.toml"     # where every step finds it (UV_CONFIG_FILE)
_HASH_FAILURES = re.compile(r"(hash mismatch|Hash mismatch|do not match the hashes|THESE PACKAGES DO NOT MATCH)", re.I)


@dataclass
class Step:
    """One step a backend needs: `script` (sh) in a container of the method's base image."""

    title: str                 # what the step does, in the user's words ("locking sd-demo")
    image: str                 # the base image's ID
    script: str
    mounts: list[BindMount] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    workdir: str | None = None
    network: str = "host"
    method: str = ""
    target: str = ""           # what the step installs for, in messages: the base image's tag
    user: str | None = None    # None: the invoking user


class StepRunner(Protocol):
    def __call__(self, ctx: Context, step: Step, on_line: Callable[[str], None] | None = None) -> list[str]:
        """Run `step`; return its output lines, or raise with the last lines when it fails."""
        ...


def run_in_container(ctx: Context, step: Step, on_line: Callable[[str], None] | None = None) -> list[str]:
    """Run `step` in a container through the engine; returns the output lines.

    Raises with the last lines (redacted) when the step fails.
    """
    lines: list[str] = []

    def collect(line: str) -> None:
        lines.append(line)
        ctx.ui.log(line)
        if on_line:
            on_line(line)

    with credentials_file(ctx, step.env) as (env, mounts):
        env = {**env, "UV_CONFIG_FILE": CONTAINER_UV_CONFIG}
        mounts = [*mounts, BindMount(WHEELS_ONLY, CONTAINER_UV_CONFIG, read_only=True)]
        spec = ContainerSpec(
            image=step.image, command=["/bin/sh", "-ec", step.script], env=env, mounts=step.mounts + mounts,
            workdir=step.workdir, user=step.user or f"{os.getuid()}:{os.getgid()}", network=step.network,
            labels={paths.LABEL_KIND: "step", paths.LABEL_METHOD: step.method},
        ).hardened()
        code = ctx.engine.run(spec, on_line=collect).exit_code
    if code != 0:
        raise _failure(ctx, step, code, lines)
    return lines


@contextlib.contextmanager
def credentials_file(ctx: Context, env: dict[str, str]) -> Iterator[tuple[dict[str, str], list[BindMount]]]:
    """Mirror credentials reach a step as a netrc file mounted read-only, never in its environment.

    Each URL in `env` loses its `user:password@`; uv, pip and poetry (requests) read the netrc that
    NETRC names. The file lives in a private temp folder for the step's lifetime only.
    """
    logins: dict[str, tuple[str, str]] = {}
    clean: dict[str, str] = {}
    for key, value in env.items():
        for url in _URL.findall(value):
            parts = urlsplit(url)
            if parts.hostname and (parts.username or parts.password):
                logins[parts.hostname] = (unquote(parts.username or ""), unquote(parts.password or ""))
                value = value.replace(url, strip_credentials(url))
        clean[key] = value
    if not logins:
        yield clean, []
        return
    with tempfile.TemporaryDirectory(dir=ctx.cache_dir, prefix=".netrc-") as folder:
        netrc = Path(folder) / "netrc"
        fd = os.open(netrc, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            for host, (login, password) in sorted(logins.items()):
                secret = password or '""'   # a token given as the user alone: an empty password
                fh.write(f"machine {host} login {login} password {secret}\n")
        yield {**clean, "NETRC": paths.CONTAINER_NETRC}, [BindMount(netrc, paths.CONTAINER_NETRC, read_only=True)]


_URL = re.compile(r"[a-z][a-z0-9+.-]*://[^\s,]+", re.I)


class SdistOnlyError(EnvmgrError):
    """Packages with only a source distribution for the target (`packages`: name -> version, "" when unknown)."""

    def __init__(self, message: str, *, hint: str | None = None, packages: dict[str, str] | None = None):
        super().__init__(message, hint=hint)
        self.packages = dict(packages or {})


def sdist_only_found(text: str) -> tuple[str, str] | None:
    """(name, version) of the package uv refused for having no usable wheel; version "" when uv named none."""
    found = SDIST_ONLY.search(text)
    if not found:
        return None
    name = found.group(1)
    if found.group(2) == "==" and found.group(3):
        return name, found.group(3)
    newest = re.search(_SDIST_VERSION.format(name=re.escape(name)), text)
    return name, (newest.group(1) or newest.group(2)) if newest else ""


def _toml_key(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else f'"{name}"'


def sdist_only_error(title: str, packages: dict[str, str], adapt: Adaptations | None = None) -> SdistOnlyError:
    """Packages with only a source distribution: envmgr builds none unless the method allows each by name at one
    exact version. The hint holds the two [adapt] lines, whole (what the spec already allows and pins merged
    in), with the version the resolver saw, to replace the spec's own `build_from_source` and `pin` lines."""
    named = ", ".join(f"{n}=={v}" if v else n for n, v in packages.items())
    several = len(packages) > 1
    message = (f"{title}: {named} {'have' if several else 'has'} only a source distribution for the target, and "
               "envmgr installs wheels only (building one runs the package's own code)")
    allowed = list(adapt.build_from_source) if adapt else []
    known = {canonicalize_name(n) for n in allowed}
    allowed += [n for n in packages if canonicalize_name(n) not in known]
    pins = dict(adapt.pin) if adapt else {}
    pinned = {canonicalize_name(n) for n in pins}
    pins.update({n: v or "VERSION" for n, v in packages.items() if canonicalize_name(n) not in pinned})
    listed = ", ".join(f'"{n}"' for n in allowed)
    pin_line = ", ".join(f'{_toml_key(n)} = "{v}"' for n, v in pins.items())
    them = "them" if several else "it"
    hint = (f"pin {'versions that ship' if several else 'a version that ships'} a wheel, or allow building {them} "
            f"(no network, no credentials) with these lines in the method's envmgr.toml [adapt]:\n"
            f"    build_from_source = [{listed}]\n    pin = {{ {pin_line} }}")
    if any(not v for v in packages.values()):
        hint += "\n(VERSION: one the index has; `pip index versions NAME` lists them)"
    return SdistOnlyError(message, hint=hint, packages=packages)


def _failure(ctx: Context, step: Step, code: int, lines: list[str]) -> EnvmgrError:
    """The one line that says why a step failed: no wheel, a failed sdist build, a hash, a mirror."""
    tail = [line for line in lines if line.strip()][-6:]
    detail = ctx.ui.redact(" | ".join(t.strip() for t in tail))[-900:]
    text = "\n".join(lines)
    no_wheel = _NO_WHEEL.search(text)
    if no_wheel:
        return EnvmgrError(f"{step.title}: {no_wheel.group(1)} has no wheel (and no sdist) for the target "
                           f"(linux, Python of {step.target})",
                           hint="pin a version that ships one, or drop it in the method's [adapt]")
    sdist_only = sdist_only_found(text)
    if sdist_only:
        return sdist_only_error(step.title, dict([sdist_only]))
    build_failed = _BUILD_FAILURE.search(text)
    if build_failed:
        call = _BUILD_CALL.search(text)
        what = f"`{call.group(1)}`" if call else "building it from its sdist"
        return EnvmgrError(f"{step.title}: {build_failed.group(1)} failed while {what}: {detail}",
                           hint="it has no wheel for the target and needs build-time dependencies (torch, a "
                                "compiler): pin a version with a wheel, or drop it in the method's [adapt]")
    if _HASH_FAILURES.search(text):
        return MirrorError(f"{step.title}: a downloaded file does not match the hash in the lock: {detail}",
                           hint="the mirror serves a different file than the one locked; nothing was tagged")
    if _MIRROR_FAILURES.search(text):
        return MirrorError(f"{step.title}: a mirror did not answer: {detail}",
                           hint="check the mirrors `envmgr doctor` shows")
    crash = uncaught_traceback(lines)
    if crash:   # a script's traceback: its last line and where, not its frames (they are in -v's output)
        frames = [m for m in (_FRAME.match(line) for line in lines) if m]
        where = f" (at {Path(frames[-1].group(1)).name}:{frames[-1].group(2)})" if frames else ""
        return EnvmgrError(f"{step.title} failed (exit {code}): {ctx.ui.redact(crash)[:900]}{where}",
                           hint="rerun with -v for the step's whole output")
    return EnvmgrError(f"{step.title} failed (exit {code}): {detail}")


_FRAME = re.compile(r'^\s*File "([^"]+)", line (\d+)')
