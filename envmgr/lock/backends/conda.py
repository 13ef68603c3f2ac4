"""Conda methods: `environment.yml` → `conda-lock.yml`, optionally with `pyproject.toml` + `poetry.lock`.

Locking runs on the host, not in a container: py-rattler solves for any target platform when it
is told the target's virtual packages (`__glibc`, `__cuda`, ...), so the admin's own OS and CPU
never leak into the lock. Repodata and packages come through the site's channel mirrors
(rattler's mirror middleware rewrites each request), while every record keeps its channel's
canonical URL: the lock names no mirror. The `pip:` section is resolved for the same target
(the solved Python and the target platform) with `uv pip compile` through the site's PyPI
mirror, and written beside the conda packages as pip entries with their sha256.

The lock is conda-lock's own format, written and read with conda-lock's models, so
`conda-lock install` can consume it. Installing also runs on the host: rattler links the locked
packages into a host folder (hashes verified, through the mirrors) with every prefix placeholder
replaced by the image's env prefix (`alternative_target_prefix`); that folder becomes the env
layer. The Python part (pip entries, and the poetry lock when the method has one) is then
installed with uv inside a container of the base image, hashes required, into the same prefix.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import subprocess
import tempfile
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from envmgr.core import paths
from envmgr.core.credentials import strip_credentials
from envmgr.core.errors import EnvmgrError, MirrorError, StaleLockError, UsageError
from envmgr.core.spec import MethodSpec
from envmgr.door.containers import BindMount
from envmgr.door.context import Context
from envmgr.door.mirrors import conda_channel_mirrors, mirror_hosts, on_host, uv_env
from envmgr.door.steps import sdist_only_error, sdist_only_found
from envmgr.images.base import BaseImage
from envmgr.lock.backends.common import compile_bytecode_script, missing_lock, run_step, uv_mounts, uv_step_env
from envmgr.lock.backends.poetry_lock import file_hashes
from envmgr.lock.backends.protocol import Evidence
from envmgr.lock.uv_cache import shared_uv_cache, uv_cache_dir

ENVIRONMENT = "environment.yml"
LOCK = "conda-lock.yml"
PYPROJECT = "pyproject.toml"

# Virtual packages every Linux target has; __glibc is that of the Debian bookworm base images.
# A spec's `virtual_packages` adds to these or overrides them (e.g. {"__cuda" = "12.4"}).
DEFAULT_VIRTUAL_PACKAGES = {"__unix": "0", "__linux": "5.10", "__glibc": "2.36"}
ARCH = {"linux-64": "x86_64", "linux-aarch64": "aarch64"}
_ENV_KEYS = {"name", "channels", "dependencies", "prefix"}


# ---------------------------------------------------------------------- environment.yml


@dataclass
class Environment:
    """What environment.yml asks for (conda match specs and pip requirements, as written)."""

    path: Path
    channels: list[str]
    conda: list[str]
    pip: list[str] = field(default_factory=list)


def _fail_at(path: Path, node, message: str) -> UsageError:
    line = f":{node.start_mark.line + 1}" if node is not None and getattr(node, "start_mark", None) else ""
    return UsageError(f"{path}{line}: {message}")


def read_environment(path: Path) -> Environment:
    """Parse environment.yml, with the line number of whatever is wrong in it."""
    import yaml

    if not path.is_file():
        raise UsageError(f"{path}: missing (a conda method needs {ENVIRONMENT})")
    root = _compose_yaml(path)
    if root is None or not isinstance(root, yaml.MappingNode):
        raise _fail_at(path, root, "expected a mapping with `channels` and `dependencies`")
    keys = {key.value: value for key, value in root.value}
    for key, _ in root.value:
        if key.value not in _ENV_KEYS:
            raise _fail_at(path, key, f"key {key.value!r} is not supported (known: {', '.join(sorted(_ENV_KEYS))})")
    if "channels" not in keys:
        raise _fail_at(path, root, "no `channels` list (name the channels to solve from)")
    channels = [value for value, _ in _yaml_strings(path, keys["channels"], "channels")]
    if "dependencies" not in keys:
        raise _fail_at(path, root, "no `dependencies` list")
    deps = keys["dependencies"]
    conda, pip = _environment_dependencies(path, deps)
    if pip and not any(_spec_name(s) == "python" for s in conda):
        raise _fail_at(path, deps, "a `pip:` section needs `python` among the conda dependencies")
    return Environment(path=path, channels=channels, conda=conda, pip=pip)


def _compose_yaml(path: Path):
    """The YAML node tree (nodes keep their line numbers, for the messages), or the parser's problem, with
    its line, as a UsageError."""
    import yaml

    try:
        return yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UsageError(f"{path}{where}: not valid YAML: {problem}") from None


def _yaml_strings(path: Path, node, what: str) -> list[tuple[str, object]]:
    """A list of non-empty strings (stripped), each with its node (for the line of a later complaint)."""
    import yaml

    if not isinstance(node, yaml.SequenceNode):
        raise _fail_at(path, node, f"`{what}` must be a list")
    out = []
    for item in node.value:
        if not isinstance(item, yaml.ScalarNode) or not str(item.value).strip():
            raise _fail_at(path, item, f"`{what}` entries must be strings")
        out.append((str(item.value).strip(), item))
    return out


def _environment_dependencies(path: Path, deps) -> tuple[list[str], list[str]]:
    """`dependencies`: (conda match specs, each parsed by rattler; the `pip:` entries), as written."""
    import yaml
    from rattler import MatchSpec

    conda: list[str] = []
    pip: list[str] = []
    if not isinstance(deps, yaml.SequenceNode):
        raise _fail_at(path, deps, "`dependencies` must be a list")
    for item in deps.value:
        if isinstance(item, yaml.MappingNode):
            entries = {k.value: v for k, v in item.value}
            if set(entries) != {"pip"}:
                raise _fail_at(path, item, "a mapping in `dependencies` must be `pip: [...]`")
            pip += [value for value, _ in _yaml_strings(path, entries["pip"], "pip")]
            continue
        if not isinstance(item, yaml.ScalarNode) or not str(item.value).strip():
            raise _fail_at(path, item, "`dependencies` entries must be conda match specs")
        text = str(item.value).strip()
        try:
            MatchSpec(text)
        except Exception as exc:  # noqa: BLE001 - rattler's parse errors have several types
            raise _fail_at(path, item, f"{text!r} is not a conda match spec: {exc}") from None
        conda.append(text)
    return conda, pip


def _spec_name(spec: str) -> str:
    return re.split(r"[\s=<>!~\[]", spec.strip(), maxsplit=1)[0].split("::")[-1].lower()


# ---------------------------------------------------------------------- mirrors


class _Network:
    """A rattler client that fetches through the site's channel mirrors, credentials sent as headers.

    Mirror URLs are given to rattler without their user:password (rattler would not send them),
    so no URL that rattler reports can carry a credential."""

    def __init__(self, ctx: Context):
        from rattler import Client
        from rattler.networking import AddHeadersMiddleware, MirrorMiddleware, RetryMiddleware

        self.mirrors: dict[str, str] = {}       # canonical channel URL -> mirror (no credentials)
        self._auth: list[tuple[str, str, str]] = []   # (host:port, path prefix, header)
        for canonical, mirror in conda_channel_mirrors(ctx.config.mirrors).items():
            parts = urlsplit(mirror)
            if parts.password is not None or parts.username:
                user, password = parts.username or "", parts.password or ""
                ctx.ui.add_secrets([s for s in (password, f"{user}:{password}") if s and s != ":"])
                token = base64.b64encode(f"{user}:{password}".encode()).decode()
                self._auth.append((parts.hostname or "", parts.path.rstrip("/"), f"Basic {token}"))
                ctx.ui.add_secrets([token])
            self.mirrors[canonical] = strip_credentials(mirror)
        middlewares: list[RetryMiddleware | MirrorMiddleware | AddHeadersMiddleware] = [RetryMiddleware(2)]
        if self.mirrors:
            middlewares.append(MirrorMiddleware({k: [v] for k, v in self.mirrors.items()}))
        if self._auth:
            middlewares.append(AddHeadersMiddleware(self._headers))
        self.client = Client(list(middlewares), timeout=120)

    def _headers(self, host: str, path: str) -> dict[str, str] | None:
        for auth_host, prefix, header in self._auth:
            if host == auth_host and path.startswith(prefix):
                return {"Authorization": header}
        return None

    def mirror_for(self, url: str) -> str:
        """Where a canonical URL is fetched from (for error messages)."""
        for canonical, mirror in self.mirrors.items():
            if url.startswith(canonical):
                return mirror
        return _channel_base(url)


def _channel_base(url: str) -> str:
    """`https://host/chan/linux-64/pkg.conda` -> `https://host/chan`."""
    parts = urlsplit(url)
    path = parts.path.rsplit("/", 2)[0] if parts.path.count("/") >= 2 else parts.path
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def _cause(text: str) -> str:
    """rattler's `A Caused by: B Caused by: C` chains: the most specific causes, no host cache paths."""
    causes = [c.strip() for c in re.split(r"\s*Caused by:\s*", text) if c.strip()]
    if causes:
        text = causes[-1] if len(causes[-1]) > 40 or len(causes) == 1 else f"{causes[-2].rstrip('.')}: {causes[-1]}"
    return re.sub(r" to /\S+", "", text)


def _shorten(text: str, limit: int = 400) -> str:
    text = re.sub(r"[│├└─]+", " ", text)
    text = re.sub(r"\s+", " ", text).strip()
    text = text.replace("Cannot solve the request because of: ", "")
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---------------------------------------------------------------------- the backend


class CondaBackend:
    name = "conda"
    env_file = ENVIRONMENT
    layered = False     # rattler links the whole prefix with the method's own path in its files: one layer

    # ------------------------------------------------------------------ detecting

    def detect(self, root: Path, pyproject: dict) -> Evidence | None:
        found = [name for name in (ENVIRONMENT, "environment.yaml") if (root / name).is_file()]
        return Evidence(found[-1]) if found else None

    def refuse_over(self, root: Path, pyproject: dict, others: list[str]) -> None:
        return None     # what else was found is named in the note; nothing of it is refused

    def lock_files(self, spec: MethodSpec) -> list[Path]:
        files = [spec.lock_path / LOCK]
        if self._has_poetry(spec):
            files.append(spec.lock_path / "poetry.lock")
        return files

    @staticmethod
    def _has_poetry(spec: MethodSpec) -> bool:
        return (spec.source_path / PYPROJECT).is_file()

    @staticmethod
    def _poetry():
        from envmgr.lock.backends.poetry import PoetryBackend

        return PoetryBackend()

    def environment(self, spec: MethodSpec) -> Environment:
        return read_environment(spec.source_path / ENVIRONMENT)

    # ------------------------------------------------------------------ inputs

    @staticmethod
    def virtual_packages(spec: MethodSpec, platform: str) -> dict[str, str]:
        return {**DEFAULT_VIRTUAL_PACKAGES, "__archspec": "1", **spec.virtual_packages}

    def content_hash(self, env: Environment, spec: MethodSpec, platform: str) -> str:
        """What the lock for `platform` was solved from (not where: mirrors are absent)."""
        data = {"channels": env.channels, "conda": env.conda, "pip": env.pip, "platform": platform,
                "virtual_packages": self.virtual_packages(spec, platform)}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    # ------------------------------------------------------------------ reading the lock

    def read_lock(self, spec: MethodSpec):
        parse_conda_lock_file = _conda_lock().parse_conda_lock_file

        path = spec.lock_path / LOCK
        if not path.is_file():
            raise missing_lock(spec, LOCK)
        try:
            return parse_conda_lock_file(path)
        except Exception as exc:  # noqa: BLE001 - yaml, pydantic and version errors alike
            raise StaleLockError(f"{path}: not a valid conda-lock file: {_shorten(str(exc), 200)}",
                                 hint=f"run `envmgr lock {spec.name}`") from None

    def _content_hashes(self, spec: MethodSpec) -> dict[str, str]:
        """The lock's per-platform content hashes, read without conda-lock's models: this is on the
        path of every no-op build, and importing conda-lock costs a third of a second."""
        import yaml

        path = spec.lock_path / LOCK
        if not path.is_file():
            raise missing_lock(spec, LOCK)
        try:
            data = yaml.load(path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
            hashes = data["metadata"]["content_hash"]
            assert data.get("version") in (1, 2) and isinstance(hashes, dict)
            return hashes
        except Exception:  # noqa: BLE001 - anything unreadable: conda-lock's reader says what
            self.read_lock(spec)
            raise StaleLockError(f"{path}: not a valid conda-lock file",
                                 hint=f"run `envmgr lock {spec.name}`") from None

    def check(self, spec: MethodSpec) -> None:
        env = self.environment(spec)
        hashes = self._content_hashes(spec)
        for platform in spec.lock_platforms:
            recorded = hashes.get(platform)
            if recorded != self.content_hash(env, spec, platform):
                what = "has no solution for" if recorded is None else "does not match"
                raise StaleLockError(f"{spec.name}: {LOCK} {what} {ENVIRONMENT} and the spec's platforms and "
                                     f"virtual packages ({platform}); it changed since the last lock",
                                     hint=f"run `envmgr lock {spec.name}`")
        if self._has_poetry(spec):
            self._poetry().check(spec)

    def locked(self, spec: MethodSpec, platform: str) -> tuple[list, list]:
        """The lock's conda and pip entries for `platform`."""
        lock = self.read_lock(spec)
        conda = [p for p in lock.package if p.platform == platform and p.manager == "conda"]
        pip = [p for p in lock.package if p.platform == platform and p.manager == "pip"]
        if not conda:
            raise StaleLockError(f"{spec.name}: {LOCK} has no packages for {platform}",
                                 hint=f"run `envmgr lock {spec.name}`")
        return conda, pip

    def summary(self, spec: MethodSpec) -> dict:
        try:
            conda, pip = self.locked(spec, spec.platform)
        except (StaleLockError, UsageError):
            return {"lock": None}
        pins = {p.name: p.version for p in conda + pip}
        if self._has_poetry(spec):
            pins.update(self._poetry().summary(spec).get("pins") or {})
        return {"lock": str(spec.lock_path / LOCK), "packages": len(pins), "pins": pins,
                "platforms": spec.lock_platforms}

    # ------------------------------------------------------------------ locking

    def lock(self, ctx: Context, spec: MethodSpec, base: BaseImage, regenerate: bool = False) -> list[Path]:
        if spec.adapt.build_from_source:
            raise UsageError(f"{spec.folder / 'envmgr.toml'}: key 'adapt.build_from_source': conda methods install "
                             "wheels only", hint="pin versions that ship wheels, or drop the key")
        lockfile_module = _conda_lock()
        LockMeta, Lockfile = lockfile_module.LockMeta, lockfile_module.Lockfile   # noqa: N806 - model classes

        env = self.environment(spec)
        network = _Network(ctx)
        previous = {}
        if not regenerate and (spec.lock_path / LOCK).is_file():
            try:
                previous = {p: self.locked(spec, p)[0] for p in spec.lock_platforms}
            except StaleLockError:
                previous = {}
        packages = []
        pythons: dict[str, str] = {}   # platform -> the solved Python's version
        with ctx.ui.progress(f"solving {spec.name} for {', '.join(spec.lock_platforms)} with py-rattler",
                             total=len(spec.lock_platforms), unit="platforms") as task:
            for platform in spec.lock_platforms:
                records = self._solve(ctx, spec, env, network, platform, previous.get(platform, []))
                packages += [_locked_conda(record, platform) for record in records]
                for record in records:
                    if record.name.normalized == "python":
                        pythons[platform] = str(record.version)
                task.advance(1)
        if env.pip:
            from concurrent.futures import ThreadPoolExecutor

            with ctx.ui.progress(f"resolving the pip: section for {', '.join(spec.lock_platforms)} with uv",
                                 total=len(spec.lock_platforms), unit="platforms") as task, \
                    ThreadPoolExecutor(max_workers=len(spec.lock_platforms)) as pool:
                jobs = [pool.submit(self._lock_pip, ctx, spec, env, platform, pythons[platform])
                        for platform in spec.lock_platforms]
                for job in jobs:
                    packages += job.result()
                    task.advance(1)
        python_versions = set(pythons.values())
        written = []
        if self._has_poetry(spec):
            for version in python_versions:
                if ".".join(version.split(".")[:2]) != spec.python:
                    raise UsageError(f"{spec.name}: the conda solution has Python {version} but the spec says "
                                     f"python = {spec.python!r}; pin `python {spec.python}.*` in {ENVIRONMENT}")
            written += self._poetry().lock(ctx, spec, base, regenerate=regenerate)
        lockfile = Lockfile(package=packages, metadata=LockMeta(
            content_hash={p: self.content_hash(env, spec, p) for p in spec.lock_platforms},
            channels=env.channels, platforms=spec.lock_platforms, sources=[ENVIRONMENT]))
        spec.lock_path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=spec.lock_path, prefix=".envmgr-lock-") as work:
            tmp = Path(work) / LOCK   # conda-lock's header names the file: give it its real name
            lockfile_module.write_conda_lock_file(lockfile, tmp, metadata_choices=None)
            text = tmp.read_text(encoding="utf-8")
            leaked = [host for host in [*mirror_hosts(ctx.config.mirrors),
                                        *(urlsplit(m).netloc for m in network.mirrors.values())]
                      if host and host in text]
            if leaked:
                raise EnvmgrError(f"{spec.name}: a mirror ({leaked[0]}) would have been recorded in {LOCK}; "
                                  "it was not written", hint=f"name channels in {ENVIRONMENT}, not their mirrors")
            tmp.replace(spec.lock_path / LOCK)
        return [spec.lock_path / LOCK, *written]

    def _solve(self, ctx: Context, spec: MethodSpec, env: Environment, network: _Network, platform: str,
               locked: list) -> list:
        from rattler import BuildString, Channel, Gateway, GenericVirtualPackage, PackageName, Platform, Version, solve
        from rattler.exceptions import GatewayError, SolverError

        virtual = []
        for name, version in self.virtual_packages(spec, platform).items():
            build = ARCH[platform] if name == "__archspec" else "0"
            virtual.append(GenericVirtualPackage(PackageName(name), Version(version), BuildString(build)))
        cache = ctx.cache_dir / "conda" / "repodata"
        cache.mkdir(parents=True, exist_ok=True)
        gateway = Gateway(cache_dir=cache, client=network.client)
        try:
            return asyncio.run(solve(env.channels, env.conda, gateway=gateway,
                                     platforms=[Platform(platform), Platform("noarch")], virtual_packages=virtual,
                                     locked_packages=[_record(p) for p in locked], channel_relations="disabled"))
        except SolverError as exc:
            raise EnvmgrError(f"{spec.name}: {ENVIRONMENT} cannot be solved for {platform}: {_shorten(str(exc))}",
                              hint="relax the conflicting specs, or check that each package exists for "
                                   f"{platform} in {', '.join(env.channels)}") from None
        except GatewayError as exc:
            where = ", ".join(network.mirrors.get(Channel(c).base_url.rstrip("/"), c) for c in env.channels)
            raise MirrorError(f"{spec.name}: channel {where} did not answer while solving for {platform}: "
                              f"{ctx.ui.redact(_shorten(_cause(str(exc)), 300))}",
                              hint="check the channel mirrors `envmgr doctor` shows") from None

    def _lock_pip(self, ctx: Context, spec: MethodSpec, env: Environment, platform: str,
                  python_version: str) -> list:
        """Resolve the `pip:` section for the target's Python and platform, hashes included."""
        glibc = self.virtual_packages(spec, platform)["__glibc"].split(".")
        minor = min(max(int(glibc[1]) if len(glibc) > 1 and glibc[1].isdigit() else 17, 17), 40)
        target = f"{ARCH[platform]}-manylinux_2_{minor}"
        work_root = ctx.cache_dir / "work"
        work_root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=work_root, prefix=f"lock-{spec.name}-pip-") as work:
            (Path(work) / "requirements.in").write_text("\n".join(env.pip) + "\n")
            environ = {**{k: v for k, v in os.environ.items() if not k.startswith("UV_")},
                       **on_host(uv_env(ctx.config.mirrors), ctx.config.mirrors),
                       "UV_CACHE_DIR": str(uv_cache_dir(ctx.cache_dir))}
            # on the host: wheels only, so no sdist's build backend ever runs here (see envmgr/door/steps.py)
            command = [str(ctx.uv_binary()), "pip", "compile", "--quiet", "--generate-hashes", "--no-header",
                       "--no-build", "--format", "pylock.toml", "--python-version", python_version,
                       "--python-platform", target, "-o", str(Path(work) / "pylock.toml"),
                       str(Path(work) / "requirements.in")]
            with shared_uv_cache(ctx.cache_dir):   # not while a layered install has lent it out
                proc = subprocess.run(command, capture_output=True, text=True, env=environ, cwd=work)
            for line in (proc.stdout + proc.stderr).splitlines():
                ctx.ui.log(line)
            sdist_only = sdist_only_found(proc.stderr)
            if proc.returncode != 0 and sdist_only:
                refused = sdist_only_error(f"locking {spec.name}'s `pip:` section", dict([sdist_only]))
                raise EnvmgrError(refused.message, hint=f"pin a version of {sdist_only[0]} that ships a wheel "
                                                      "(conda methods build no source distributions)")
            if proc.returncode != 0:
                detail = ctx.ui.redact(" | ".join(line.strip() for line in proc.stderr.splitlines()
                                                  if line.strip())[-600:])
                error = MirrorError if re.search(r"(connect|timed out|401|403|Failed to fetch)", proc.stderr, re.I) \
                    else EnvmgrError
                raise error(f"{spec.name}: the `pip:` section of {ENVIRONMENT} cannot be resolved for {platform} "
                            f"(Python {python_version}): {detail}")
            pylock = tomllib.loads((Path(work) / "pylock.toml").read_text())
        return [_locked_pip(package, platform, python_version, spec) for package in pylock.get("packages", [])]

    # ------------------------------------------------------------------ installing

    def install(self, ctx: Context, spec: MethodSpec, base: BaseImage, prefix: Path) -> None:
        conda, pip = self.locked(spec, spec.platform)
        self._install_conda(ctx, spec, conda, prefix)
        python = next((p for p in conda if p.name == "python"), None)
        requirements = [_pip_requirement(p) for p in pip]
        if self._has_poetry(spec):
            if python is None:
                raise UsageError(f"{spec.name}: a pyproject.toml needs `python` among the conda dependencies")
            poetry = self._poetry().requirements(spec, replace(base, python_version=python.version))
            requirements += [poetry]
        if requirements:
            self._install_python(ctx, spec, base, prefix, "\n".join(requirements) + "\n")

    def _install_conda(self, ctx: Context, spec: MethodSpec, conda: list, prefix: Path) -> None:
        from rattler import Platform, install

        network = _Network(ctx)
        records = [_record(p) for p in conda]
        cache = ctx.cache_dir / "conda" / "pkgs"
        cache.mkdir(parents=True, exist_ok=True)
        with ctx.ui.progress(f"installing {len(records)} locked conda packages into {spec.env_prefix}",
                             total=len(records), unit="packages") as task:
            reporter = _Reporter(task.advance)
            try:
                asyncio.run(install(records, prefix, cache_dir=cache, client=network.client,
                                    platform=Platform(spec.platform), alternative_target_prefix=spec.env_prefix,
                                    execute_link_scripts=False, show_progress=False,
                                    reporter=reporter))  # type: ignore[arg-type]  # rattler calls only the callbacks it finds
            except Exception as exc:  # noqa: BLE001 - rattler raises several error types here
                raise self._install_error(ctx, spec, network, conda, exc, reporter) from None
        _normalize_prefix(prefix)

    def _install_error(self, ctx: Context, spec: MethodSpec, network: _Network, conda: list, exc: Exception,
                       reporter: "_Reporter") -> EnvmgrError:
        text = str(exc)
        package = next((p for p in conda if p.url.rsplit("/", 1)[-1] in text), None)
        if package is None and reporter.current:
            package = next((p for p in conda if p.name == reporter.current), None)
        name = f"{package.name} {package.version}" if package else "a package"
        mirror = network.mirror_for(package.url) if package else ", ".join(network.mirrors.values()) or "its channel"
        detail = ctx.ui.redact(_shorten(_cause(text), 300))
        if re.search(r"(sha256|md5|hash|checksum)", text, re.I) and re.search(r"(mismatch|match|expected)", text, re.I):
            return MirrorError(f"{spec.name}: {name} from {mirror} does not match the hash in {LOCK}: {detail}",
                               hint="the mirror serves a different file than the one locked; nothing was tagged")
        if re.search(r"(connect|request|status|timed out|dns|40\d|50\d)", text, re.I):
            return MirrorError(f"{spec.name}: {name} could not be fetched from {mirror}: {detail}",
                               hint="check the channel mirrors `envmgr doctor` shows; nothing was tagged")
        return EnvmgrError(f"{spec.name}: installing {name} failed: {detail}")

    def _install_python(self, ctx: Context, spec: MethodSpec, base: BaseImage, prefix: Path,
                        requirements: str) -> None:
        """Install exact hashed pins with uv into the conda env's own Python, in a base image container."""
        count = requirements.count("==")
        python = f"{spec.env_prefix}/bin/python"
        if not (prefix / "bin" / "python").exists() and not (prefix / "bin" / "python").is_symlink():
            raise UsageError(f"{spec.name}: pip packages need `python` among the conda dependencies")
        work_root = ctx.cache_dir / "work"
        work_root.mkdir(parents=True, exist_ok=True)
        uv = paths.CONTAINER_UV
        script = "\n".join([
            f"{uv} pip install --python {python} --require-hashes --no-deps --strict "
            f"-r {paths.CONTAINER_WORK}/requirements.txt",
            *compile_bytecode_script(python),
        ])
        with tempfile.TemporaryDirectory(dir=work_root, prefix=f"install-{spec.name}-") as work:
            (Path(work) / "requirements.txt").write_text(requirements)
            with ctx.ui.progress(f"installing {count} locked Python packages into {spec.env_prefix}",
                                 total=count, unit="packages") as task:
                run_step(ctx, base, f"installing {spec.name}'s Python packages", script,
                         [BindMount(prefix, spec.env_prefix, read_only=False),
                          BindMount(Path(work), paths.CONTAINER_WORK, read_only=True), *uv_mounts(ctx)],
                         uv_step_env(ctx), method=spec.name,
                         on_line=lambda line: task.advance(1) if line.strip().startswith("+ ") else None)

    def layer_entries(self, ctx: Context, spec: MethodSpec, base: BaseImage) -> None:
        return None     # not layered: `install` makes the environment's one layer

    # ------------------------------------------------------------------ what else is asked of a backend

    def entry_prefix(self, spec: MethodSpec) -> list[str]:
        """Start the entry through `conda run`, so the env's activate.d scripts run first."""
        return ["conda", "run", "-n", spec.name, "--no-capture-output"]

    def drift(self, spec: MethodSpec) -> None:
        return None     # conda locks are solved afresh; no repository lock is compared

    def seeded_from(self, spec: MethodSpec) -> None:
        return None

    def lock_file_hashes(self, spec: MethodSpec) -> dict[str, list[str]]:
        """The Python part's poetry.lock (conda packages carry their sha256 in conda-meta)."""
        return file_hashes(spec.lock_path / "poetry.lock")


# ---------------------------------------------------------------------- conversions


def _conda_lock():
    """conda-lock's reader, writer and models (its vendored conda warns about itself on import)."""
    import warnings
    from types import SimpleNamespace

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        from conda_lock.lockfile import parse_conda_lock_file, write_conda_lock_file
        from conda_lock.lockfile.v2prelim.models import HashModel, LockedDependency, Lockfile, LockMeta

    return SimpleNamespace(parse_conda_lock_file=parse_conda_lock_file, write_conda_lock_file=write_conda_lock_file,
                           HashModel=HashModel, LockedDependency=LockedDependency, LockMeta=LockMeta,
                           Lockfile=Lockfile)


class _Reporter:
    """rattler's installer callbacks -> a progress bar (and the package being linked, for errors)."""

    def __init__(self, advance):
        self.advance = advance
        self.current = ""

    def on_populate_cache_start(self, operation: int, package_name: str) -> int:
        self.current = package_name
        return operation

    def on_link_start(self, operation: int, package_name: str) -> int:
        self.current = package_name
        return operation

    def on_link_complete(self, index: int) -> None:
        self.advance(1)


def _dependencies(depends: list[str]) -> dict[str, str]:
    out = {}
    for dep in depends:
        name, _, rest = dep.strip().partition(" ")
        out[name] = rest.strip()
    return out


def _locked_conda(record, platform: str):
    models = _conda_lock()
    HashModel, LockedDependency = models.HashModel, models.LockedDependency   # noqa: N806 - model classes

    return LockedDependency(
        name=record.name.normalized, version=str(record.version), manager="conda", platform=platform,
        dependencies=_dependencies(list(record.depends)), url=record.url, build=str(record.build),
        hash=HashModel(md5=record.md5.hex(), sha256=record.sha256.hex()), categories={"main"})


def _record(locked):
    """A conda-lock entry back into the record rattler installs (the package's own index.json is
    read at link time, so what the lock does not carry, e.g. noarch, still comes from the package)."""
    from rattler import BuildString, PackageRecord, RepoDataRecord

    file_name = locked.url.rsplit("/", 1)[-1]
    subdir = locked.url.rsplit("/", 2)[-2]
    build = locked.build or file_name.rsplit("-", 1)[-1].split(".")[0]
    number = build.rsplit("_", 1)[-1]
    record = PackageRecord(
        name=locked.name, version=locked.version, build=BuildString(build),
        build_number=int(number) if number.isdigit() else 0, subdir=subdir,
        depends=[f"{name} {spec}".strip() for name, spec in locked.dependencies.items()],
        md5=bytes.fromhex(locked.hash.md5), sha256=bytes.fromhex(locked.hash.sha256) if locked.hash.sha256 else None)
    return RepoDataRecord(record, file_name=file_name, url=locked.url, channel=_channel_base(locked.url) + "/")


def _pypi_file_url(name: str, file_name: str) -> str:
    """A host-free identifier of a pip file, `pypi:<name>/<file>`: the lock says which file (and
    its hash), never where from. envmgr installs pip entries by name, version and hash through
    whatever index the site configures."""
    return f"pypi:{name}/{file_name}"


def _locked_pip(package: dict, platform: str, python_version: str, spec: MethodSpec):
    models = _conda_lock()
    HashModel, LockedDependency = models.HashModel, models.LockedDependency   # noqa: N806 - model classes
    from packaging.tags import compatible_tags, cpython_tags
    from packaging.utils import canonicalize_name, parse_wheel_filename

    name = canonicalize_name(package["name"])
    files = [(w["url"].rsplit("/", 1)[-1], w["hashes"]["sha256"]) for w in package.get("wheels", [])]
    chosen = None
    if files:
        major_minor = tuple(int(x) for x in python_version.split(".")[:2])
        arch = ARCH[platform]
        glibc_minor = int((spec.virtual_packages.get("__glibc") or DEFAULT_VIRTUAL_PACKAGES["__glibc"]).split(".")[1])
        platforms = [f"manylinux_2_{m}_{arch}" for m in range(glibc_minor, 16, -1)]
        platforms += [f"manylinux2014_{arch}", f"linux_{arch}"]
        order = {tag: i for i, tag in enumerate([*cpython_tags(major_minor, platforms=platforms),
                                                 *compatible_tags(major_minor, platforms=platforms)])}
        ranked = []
        for file_name, sha in files:
            tags = parse_wheel_filename(file_name)[3]
            best = min((order[t] for t in tags if t in order), default=None)
            if best is not None:
                ranked.append((best, file_name, sha))
        chosen = min(ranked)[1:] if ranked else None
    if chosen is None and package.get("sdist"):
        sdist = package["sdist"]
        chosen = (sdist.get("name") or sdist["url"].rsplit("/", 1)[-1], sdist["hashes"]["sha256"])
    if chosen is None:
        raise EnvmgrError(f"{spec.name}: no file of {name} {package['version']} installs on {platform}")
    return LockedDependency(name=name, version=str(package["version"]), manager="pip", platform=platform,
                            dependencies={}, url=_pypi_file_url(name, chosen[0]),
                            hash=HashModel(sha256=chosen[1]), categories={"main"})


def _pip_requirement(locked) -> str:
    return f"{locked.name}=={locked.version} --hash=sha256:{locked.hash.sha256}"


def _normalize_prefix(prefix: Path) -> None:
    """Drop what would make the layer depend on this machine: host cache paths in conda-meta."""
    (prefix / "CACHEDIR.TAG").unlink(missing_ok=True)
    (prefix / ".lock").unlink(missing_ok=True)   # rattler's lock file for the prefix (mode 0666)
    for meta in sorted((prefix / "conda-meta").glob("*.json")):
        data = json.loads(meta.read_text())
        for key in ("extracted_package_dir", "package_tarball_full_path", "link"):
            data.pop(key, None)
        meta.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
