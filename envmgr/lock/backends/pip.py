"""Plain pip methods: `requirements.txt` → `requirements.lock.txt` (exact pins, every file's hash).

Resolved with `uv pip compile --generate-hashes` inside a container of the method's base image,
so the target's own Python and platform decide every marker and wheel — uv because it is
already envmgr's installer (one pinned binary), resolves fast, and writes hashed, exact
requirements without recording the index it used. Installed with hashes required. A repository's
own exact pins (envmgr/lock/repository_pins.py) seed the first lock: uv keeps what it can of them.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import re
import shutil
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from packaging.utils import canonicalize_name

from envmgr.core import paths
from envmgr.core.errors import EnvmgrError, StaleLockError, UsageError
from envmgr.core.files import atomic_write
from envmgr.core.spec import MethodSpec
from envmgr.door.containers import BindMount
from envmgr.door.context import Context
from envmgr.door.mirrors import mirror_hosts
from envmgr.door.steps import SdistOnlyError, sdist_only_error
from envmgr.images.base import BaseImage
from envmgr.lock.adapt import effective_requirements, lock_drift, raise_if_unreachable
from envmgr.lock.backends import source_builds
from envmgr.lock.backends.common import (
    install_requirements_script,
    missing_lock,
    run_step,
    split_requirements,
    uv_mounts,
    uv_step_env,
)
from envmgr.lock.backends.protocol import Evidence
from envmgr.lock.repository_pins import (
    SEED_RECORD,
    RepositoryPins,
    as_lock,
    find_pins,
    lock_pins,
    recorded_seed,
    seed_requirements,
)

MANIFEST = "requirements.txt"
PROJECT = "requirements.project.txt"     # a setup.py / dynamic-metadata project's dependencies, read in the box
PROJECT_HEADER = "# envmgr: dependencies of the project's metadata; its files' sha256: "
EFFECTIVE = "requirements.in"
LOCK = "requirements.lock.txt"
HEADER = "# envmgr lock: "


class PipBackend:
    name = "pip"
    env_file = MANIFEST
    layered = True

    # ------------------------------------------------------------------ detecting

    def detect(self, root: Path, pyproject: dict) -> Evidence | None:
        """requirements.txt; else, weakly, a project whose build backend names its dependencies."""
        if (root / MANIFEST).is_file():
            return Evidence(MANIFEST)
        if _dependencies_from_backend(root, pyproject):
            found = next(n for n in ("setup.py", "setup.cfg", "pyproject.toml") if (root / n).is_file())
            return Evidence(found + " (dependencies named by its build backend, read in a box with no network)",
                            weak=True)
        return None

    def refuse_over(self, root: Path, pyproject: dict, others: list[str]) -> None:
        return None     # pip is the last choice: it never wins over another kind

    def lock_files(self, spec: MethodSpec) -> list[Path]:
        return [spec.lock_path / LOCK]

    def _effective(self, ctx_sources: dict[str, str], spec: MethodSpec,
                   theirs: RepositoryPins | None = None) -> tuple[str, list[str], list[str]]:
        path = spec.source_path / MANIFEST
        if not path.is_file():
            if not is_project(spec):
                raise UsageError(f"{path}: missing (a pip method needs requirements.txt, or a setup.py or "
                                 "pyproject.toml whose build backend names its dependencies)")
            path = spec.lock_path / PROJECT
            if not path.is_file():
                raise missing_lock(spec, LOCK)
        return effective_requirements(path.read_text(encoding="utf-8"), spec.adapt, path, ctx_sources,
                                      base=spec.source_path, locked=theirs.versions() if theirs else None)

    def _project_requirements(self, ctx: Context, spec: MethodSpec, base: BaseImage, regenerate: bool) -> None:
        """A project without requirements.txt: its dependencies, read in the box from its build backend, are
        written to the lock folder (with the hash of the files they came from), then locked like a
        requirements.txt. Read again when those files change or with --regenerate."""
        generated = spec.lock_path / PROJECT
        header = PROJECT_HEADER + project_hash(spec)
        if not regenerate and generated.is_file() and generated.read_text().splitlines()[:1] == [header]:
            return
        found = source_builds.project_requirements(ctx, spec, base, [])   # the site's indexes only
        spec.lock_path.mkdir(parents=True, exist_ok=True)
        atomic_write(generated, header + "\n# the dependencies its build backend named (envmgr ran it with no "
                     "network and no credentials)\n" + "".join(line + "\n" for line in found))

    def _inputs_hash(self, effective: str, spec: MethodSpec, as_of: str | None = None) -> str:
        dated = f"\0as of {as_of}" if as_of else ""     # undated locks keep the hash they always had
        return hashlib.sha256(f"{effective}\0{spec.python}\0{spec.platform}{dated}".encode()).hexdigest()

    def _as_of(self, spec: MethodSpec, theirs: RepositoryPins | None) -> tuple[str | None, str]:
        """(the day uv may take versions up to, exclusive, and why) — None: the newest versions."""
        return resolve_as_of(spec, theirs is not None)

    def check(self, spec: MethodSpec, site_sources: dict[str, str] | None = None) -> None:
        lock = spec.lock_path / LOCK
        if not lock.is_file():
            raise missing_lock(spec, LOCK)
        generated = spec.lock_path / PROJECT
        if is_project(spec) and generated.is_file() \
                and generated.read_text().splitlines()[:1] != [PROJECT_HEADER + project_hash(spec)]:
            raise StaleLockError(f"{spec.name}: the project's {', '.join(source_builds.PROJECT_FILES)} changed "
                                 "since its dependencies were read", hint=f"run `envmgr lock {spec.name}`")
        theirs = self._repository_pins(spec)
        effective, _, _ = self._effective(site_sources or {}, spec)
        text = lock.read_text(encoding="utf-8")
        first = text.splitlines()[:1]
        as_of, _ = self._as_of(spec, theirs)
        undated = as_of is not None and UNDATED_NOTE in text   # the index had no upload dates when it was locked
        if not first or first[0] != HEADER + self._inputs_hash(effective, spec, None if undated else as_of):
            raise StaleLockError(f"{spec.name}: {LOCK} does not match {MANIFEST} and the spec's [adapt]",
                                 hint=f"run `envmgr lock {spec.name}`")

    def summary(self, spec: MethodSpec) -> dict:
        lock = spec.lock_path / LOCK
        if not lock.is_file():
            return {"lock": None, "adaptations": spec.adapt.describe()}
        pins = dict(re.findall(r"^([A-Za-z0-9_.\-\[\],]+)==(\S+)", lock.read_text(), flags=re.M))
        return {"lock": str(lock), "packages": len(pins), "pins": pins, "adaptations": spec.adapt.describe()}

    def _repository_pins(self, spec: MethodSpec) -> RepositoryPins | None:
        """The repository's own exact pins (what its authors tested); detected only when envmgr writes its lock
        elsewhere (a method whose folder holds envmgr's lock is envmgr's own)."""
        found = find_pins(spec.source_path, spec.adapt, spec.folder / "envmgr.toml",
                          detect=spec.lock_path != spec.source_path)
        if found is not None and found.path.resolve() == (spec.lock_path / LOCK).resolve():
            raise UsageError(f"{spec.folder / 'envmgr.toml'}: key 'adapt.repository_pins': {found.relative} is "
                             "envmgr's own lock of this method", hint="name the repository's pins file")
        return found

    def seeded_from(self, spec: MethodSpec) -> str | None:
        """The repository's file the lock started from (None: it has none, or no lock yet)."""
        lock = spec.lock_path / LOCK
        recorded = recorded_seed(lock.read_text(encoding="utf-8")) if lock.is_file() else None
        return recorded.rsplit(" ", 1)[0] if recorded else None

    def drift(self, spec: MethodSpec) -> list[dict[str, str | None]] | None:
        """What envmgr's lock changed against the repository's pins (None: no pins of its own, or no lock)."""
        theirs = self._repository_pins(spec)
        lock = spec.lock_path / LOCK
        if theirs is None or not lock.is_file():
            return None
        return lock_drift(as_lock([(p.name, p.version) for p in theirs.pins]),
                          as_lock(lock_pins(lock.read_text(encoding="utf-8"))))

    def lock(self, ctx: Context, spec: MethodSpec, base: BaseImage, regenerate: bool = False) -> list[Path]:
        if is_project(spec):
            self._project_requirements(ctx, spec, base, regenerate)
        theirs = self._repository_pins(spec)
        effective, extra, problems = self._effective(ctx.config.mirrors.sources, spec, theirs)
        raise_if_unreachable(spec.name, problems)
        spec.lock_path.mkdir(parents=True, exist_ok=True)
        work_root = ctx.cache_dir / "work"
        work_root.mkdir(parents=True, exist_ok=True)
        previous = spec.lock_path / LOCK
        previous_text = previous.read_text(encoding="utf-8") if previous.is_file() else None
        # uv keeps the versions already in its output file: envmgr's previous lock, else (first lock, the
        # repository's pins changed, --regenerate) the repository's pins; a method without them solves afresh
        reseed = theirs is not None and (regenerate or previous_text is None
                                         or recorded_seed(previous_text) != theirs.record[len(SEED_RECORD):])
        with tempfile.TemporaryDirectory(dir=work_root, prefix=f"lock-{spec.name}-") as work:
            (Path(work) / EFFECTIVE).write_text(effective)
            upgrade = ""
            if reseed and theirs is not None:
                # a +cu124 label is kept only where a mirror of a repository's index may serve it (its index
                # mapped to the default one has no local versions: uv would drop the preference, not the label)
                (Path(work) / LOCK).write_text(seed_requirements(theirs, spec.adapt, strip_labels=not extra))
            elif previous_text is not None and not regenerate:
                shutil.copy2(previous, Path(work) / LOCK)
            else:
                upgrade = "--upgrade"
            command = (f"{paths.CONTAINER_UV} pip compile --quiet --generate-hashes --no-header "
                       f"--python {base.python} {upgrade} -o {paths.CONTAINER_WORK}/{LOCK} "
                       f"{paths.CONTAINER_WORK}/{EFFECTIVE}")
            as_of, why = self._as_of(spec, theirs)
            # the packages the method allows to build from source: built in their box first, found as wheels
            built = source_builds.build_for_lock(ctx, spec, base, extra, effective)
            if built:
                source_builds.stage_for_lock(built, Path(work) / "built")
                command += f" --find-links {paths.CONTAINER_WORK}/built"
            with ctx.ui.progress(f"locking {spec.name} with uv pip compile in {base.tag}"
                                 + (f", starting from the repository's {theirs.relative}" if reseed and theirs
                                    else "") + (f", versions published before {as_of} ({why})" if as_of else ""),
                                 total=1, unit="steps") as task:
                undated = False
                try:
                    _compile_naming_every_sdist(ctx, spec, base, command + (f" --exclude-newer {as_of}"
                                                                            if as_of else ""), Path(work), extra)
                except NoUploadDates:
                    # the index says not when its files were published: the newest versions, said so
                    ctx.ui.warn(f"{spec.name}: the package index gives no upload dates, so the lock takes the "
                                f"newest versions, not those published before {as_of} ({why})")
                    undated = True
                    _compile_naming_every_sdist(ctx, spec, base, command, Path(work), extra)
                task.advance(1)
            body = (Path(work) / LOCK).read_text(encoding="utf-8")
            body = "\n".join(line for line in body.splitlines()
                             if not line.startswith((HEADER, SEED_RECORD, DATED_PREFIX))) + "\n"
            body = source_builds.record_sdist_hashes(body, built)
            declared_hosts = [urlsplit(url).hostname for url in (theirs.indexes if theirs else ())]
            if [host for host in [*mirror_hosts(ctx.config.mirrors), *declared_hosts] if host and host in body] \
                    or re.search(r"^\s*(-i|--index-url|--extra-index-url|-f|--find-links)\b", body, re.M):
                raise EnvmgrError(f"{spec.name}: the resolver recorded an index in the lock; it was not written")
            dated = as_of if as_of and not undated else None
            text = (HEADER + self._inputs_hash(effective, spec, dated) + "\n"
                    + (f"# envmgr: versions published before {as_of}\n" if dated else "")
                    + (f"{UNDATED_NOTE}\n" if undated else "")
                    + (theirs.record + "\n" if theirs else "") + body)
            for name, content in ((EFFECTIVE, effective), (LOCK, text)):
                atomic_write(spec.lock_path / name, content)
        return [spec.lock_path / LOCK, spec.lock_path / EFFECTIVE]

    def layer_entries(self, ctx: Context, spec: MethodSpec, base: BaseImage) -> tuple[list[str], list[str]]:
        """(one requirement per distribution, mirrors of declared indexes): what build installs unit by unit."""
        lock = spec.lock_path / LOCK
        if not lock.is_file():
            raise missing_lock(spec, LOCK)
        _, extra, _ = self._effective(ctx.config.mirrors.sources, spec)
        return source_builds.with_built_wheels(ctx, spec, base, split_requirements(lock.read_text(encoding="utf-8")),
                                               extra)

    def entry_prefix(self, spec: MethodSpec) -> list[str]:
        return []       # the venv's interpreter is on PATH: nothing to activate

    def lock_file_hashes(self, spec: MethodSpec) -> dict[str, list[str]]:
        return {}       # the SBOM reads file hashes from poetry locks only

    def install(self, ctx: Context, spec: MethodSpec, base: BaseImage, prefix: Path) -> None:
        lock = spec.lock_path / LOCK
        count = len(re.findall(r"^[A-Za-z0-9_.\-]+==", lock.read_text(), flags=re.M))
        _, extra, _ = self._effective(ctx.config.mirrors.sources, spec)
        work_root = ctx.cache_dir / "work"
        work_root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=work_root, prefix=f"install-{spec.name}-") as work:
            shutil.copy2(lock, Path(work) / "requirements.txt")
            script = install_requirements_script(base, spec.env_prefix, f"{paths.CONTAINER_WORK}/requirements.txt")
            with ctx.ui.progress(f"installing {count} locked packages into {spec.env_prefix}", total=count,
                                 unit="packages") as task:
                run_step(ctx, base, f"installing {spec.name}'s environment", script,
                         [BindMount(prefix, spec.env_prefix, read_only=False),
                          BindMount(Path(work), paths.CONTAINER_WORK, read_only=True), *uv_mounts(ctx)],
                         uv_step_env(ctx, extra), method=spec.name,
                         on_line=lambda line: task.advance(1) if line.strip().startswith("+ ") else None)


def _dependencies_from_backend(root: Path, pyproject: dict) -> bool:
    """A project whose dependencies only its build backend knows: setup.py / setup.cfg, or a pyproject.toml
    whose [project] declares them dynamic (computed when the backend runs)."""
    if (root / "setup.py").is_file() or (root / "setup.cfg").is_file():
        return True
    project = pyproject.get("project", {})
    return "dependencies" in (project.get("dynamic") or []) and "build-system" in pyproject


UNDATED_NOTE = "# envmgr: the index gave no upload dates: the newest versions"
DATED_PREFIX = "# envmgr: versions published before "
_MISSING_UPLOAD_DATE = re.compile(r"(missing an upload date|no upload date|without an upload time)", re.I)


class NoUploadDates(EnvmgrError):
    """The index serves no upload times, so a dated solve excludes everything."""


def resolve_as_of(spec: MethodSpec, has_pins: bool) -> tuple[str | None, str]:
    """(the day, exclusive, whose versions a pip lock takes, and why); None: the newest. The spec's
    [adapt] resolve_as_of wins; else a repository that pins nothing (no lock, no exact pins of its own) is
    locked as of the day after its `source_date`: what its authors could have installed."""
    chosen = spec.adapt.resolve_as_of
    if chosen is False:
        return None, ""
    if chosen:
        return chosen, "[adapt] resolve_as_of"
    if has_pins or not spec.source_date:
        return None, ""
    day = datetime.date.fromisoformat(spec.source_date) + datetime.timedelta(days=1)
    return day.isoformat(), f"the repository's date, {spec.source_date}"


PROBE_OVERRIDES = "sdist-only-probe.txt"
MAX_SDIST_PROBES = 40


def _compile_naming_every_sdist(ctx: Context, spec: MethodSpec, base: BaseImage, command: str, work: Path,
                                extra: list[str]) -> None:
    """`uv pip compile`, wheels only. uv stops at the first package that has only a source distribution; to name
    them all in one message (not one `envmgr lock` each), the solve goes on with each one found left out (an
    override whose marker is never true) until it succeeds or finds no new one. Nothing of those probes is
    kept: the lock is written only by a solve that left nothing out."""
    found: dict[str, str] = {}
    probe = work / PROBE_OVERRIDES
    while True:
        said: list[str] = []
        try:
            run_step(ctx, base, f"locking {spec.name}",
                     command + (f" --override {paths.CONTAINER_WORK}/{PROBE_OVERRIDES}" if found else ""),
                     [BindMount(work, paths.CONTAINER_WORK, read_only=False), *uv_mounts(ctx)],
                     uv_step_env(ctx, extra), workdir=paths.CONTAINER_WORK, method=spec.name, on_line=said.append)
        except SdistOnlyError as exc:
            new = {n: v for n, v in exc.packages.items() if canonicalize_name(n) not in
                   {canonicalize_name(k) for k in found}}
            if not new or len(found) >= MAX_SDIST_PROBES:
                raise sdist_only_error(f"locking {spec.name}", {**found, **exc.packages}, spec.adapt) from None
            found.update(new)
            ctx.ui.log(f"{', '.join(new)}: only a source distribution; solving on without "
                       f"{'them' if len(new) > 1 else 'it'} to find any other")
            probe.write_text("".join(f"{name} ; sys_platform == 'envmgr-probe'\n" for name in found))
            continue
        except EnvmgrError as exc:
            if found:   # the probe's solve failed for another reason: what was found is still the answer
                raise sdist_only_error(f"locking {spec.name}", found, spec.adapt) from None
            if "--exclude-newer" in command and "exclude-newer" in "\n".join(said) + str(exc):
                if _index_lacks_upload_dates(ctx, spec, base, command, work, extra):
                    raise NoUploadDates(str(exc)) from None
                raise EnvmgrError(exc.message, hint="a requirement or pin asks for a version published after the "
                                  "day the lock resolves as of: set [adapt] resolve_as_of = \"YYYY-MM-DD\" (a later "
                                  "day) or false (the newest versions)") from None
            raise
        break
    probe.unlink(missing_ok=True)
    if found:
        raise sdist_only_error(f"locking {spec.name}", found, spec.adapt)


def _index_lacks_upload_dates(ctx: Context, spec: MethodSpec, base: BaseImage, command: str, work: Path,
                              extra: list[str]) -> bool:
    """A dated solve found nothing: uv says why only in its warnings (`--quiet` hides them), so it runs once more
    without `--quiet`, into a scratch file, and envmgr reads whether the index left its files undated."""
    said: list[str] = []
    scratch = command.replace("--quiet ", "").replace(f"-o {paths.CONTAINER_WORK}/{LOCK}",
                                                       f"-o {paths.CONTAINER_WORK}/dated-probe.txt")
    with contextlib.suppress(EnvmgrError):
        run_step(ctx, base, f"locking {spec.name}", scratch,
                 [BindMount(work, paths.CONTAINER_WORK, read_only=False), *uv_mounts(ctx)],
                 uv_step_env(ctx, extra), workdir=paths.CONTAINER_WORK, method=spec.name, on_line=said.append)
    (work / "dated-probe.txt").unlink(missing_ok=True)
    return bool(_MISSING_UPLOAD_DATE.search("\n".join(said)))


def is_project(spec: MethodSpec) -> bool:
    """A pip method without requirements.txt whose dependencies its build backend names (setup.py, setup.cfg,
    or a pyproject.toml with a [build-system])."""
    source = spec.source_path
    return not (source / MANIFEST).is_file() and any((source / name).is_file()
                                                     for name in source_builds.PROJECT_FILES)


def project_hash(spec: MethodSpec) -> str:
    sha = hashlib.sha256()
    for name in source_builds.PROJECT_FILES:
        path = spec.source_path / name
        if path.is_file():
            sha.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return sha.hexdigest()
