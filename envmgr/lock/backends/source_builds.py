"""Source distributions a method allows by name (`[adapt] build_from_source`), built in a box of their own.

envmgr locks and installs wheels only (envmgr/door/steps.py): building an sdist runs the package's own code,
and the steps that download have the network, the mirror credentials and the shared uv cache. A package
the method names is built in three steps instead:

1. fetch (envmgr's own download step, executes nothing): a standard-library script downloads the sdist of
   the exact version from the configured indexes and checks its sha256 (the index's, and the lock's once
   there is one); the host reads `[build-system]` from the archive without unpacking it; uv, wheels only,
   installs those build requirements into a folder of their own (`--target`).
2. build (the box): no network, no credentials, no CA bundle, no cache or prefix mounted, as uid 65534 on a
   read-only root; the sdist and its build requirements mounted read-only, one empty folder writable. A
   small PEP 517 front end in the base image's Python unpacks the sdist in /tmp and calls the backend.
3. the wheel of that name and version (nothing else the backend left) is kept in
   `<cache>/built/<sdist sha256>-<base>/` and installed like any other wheel: at lock through
   `--find-links` (the lock then records the sdist's hash, never the built wheel's), at build through
   a read-only index envmgr serves on 127.0.0.1 for the rest of the process, hash-pinned.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import os
import re
import shlex
import shutil
import tarfile
import tempfile
import threading
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from envmgr.core import paths
from envmgr.core.errors import EnvmgrError, UsageError
from envmgr.core.spec import MethodSpec
from envmgr.door.containers import BindMount
from envmgr.door.context import Context
from envmgr.door.steps import Step
from envmgr.images.base import BaseImage
from envmgr.lock.backends.common import run_step, uv_mounts, uv_step_env

BOX_USER = "65534:65534"                      # nobody: owns nothing on the host
CONTAINER_SDIST = "/opt/envmgr/sdist"
CONTAINER_BUILD_ENV = "/opt/envmgr/build-env"
CONTAINER_OUT = "/opt/envmgr/out"
CONTAINER_BUILT = "/opt/envmgr/built"          # the built wheels, read-only, at lock time
SDIST_MARK = "ENVMGR-SDIST "
DEFAULT_BUILD_SYSTEM = {"requires": ["setuptools>=40.8.0"], "build-backend": "setuptools.build_meta:__legacy__"}

FETCH_SCRIPT = r'''
import base64, hashlib, html.parser, netrc, os, re, ssl, sys, urllib.error, urllib.parse, urllib.request

name, version, want, out = sys.argv[1:5]


def normal(value):
    return re.sub(r"[-_.]+", "-", value).lower()


context = ssl.create_default_context(cafile=os.environ.get("SSL_CERT_FILE") or None)
opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=context))
logins = netrc.netrc(os.environ["NETRC"]) if os.environ.get("NETRC") else None


def get(url):
    request = urllib.request.Request(url)
    login = logins.authenticators(urllib.parse.urlsplit(url).hostname or "") if logins else None
    if login:   # never sent on to a redirect's host
        token = base64.b64encode(f"{login[0]}:{login[2] or ''}".encode()).decode()
        request.add_unredirected_header("Authorization", "Basic " + token)
    with opener.open(request, timeout=120) as answer:
        return answer.geturl(), answer.read()


class Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.hrefs = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self.hrefs += [value for key, value in attrs if key == "href" and value]


indexes = [os.environ.get("UV_DEFAULT_INDEX", ""), *os.environ.get("UV_INDEX", "").split()]
for index in [i for i in indexes if i]:
    try:
        page, body = get(index.rstrip("/") + "/" + normal(name) + "/")
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            continue
        raise
    links = Links()
    links.feed(body.decode("utf-8", "replace"))
    for href in links.hrefs:
        url, _, fragment = urllib.parse.urljoin(page, href).partition("#")
        file = urllib.parse.unquote(urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1])
        stem = file[:-7] if file.endswith(".tar.gz") else file[:-4] if file.endswith(".zip") else None
        if stem is None or "/" in file or file.startswith("."):
            continue
        project, _, found = stem.rpartition("-")
        if normal(project) != normal(name) or found != version:
            continue
        _, data = get(url)
        digest = hashlib.sha256(data).hexdigest()
        listed = fragment[len("sha256="):] if fragment.startswith("sha256=") else ""
        if (listed and digest != listed) or (want and digest not in want.split(",")):
            sys.exit(f"{file}: sha256 {digest} does not match the index or the lock")
        with open(os.path.join(out, file), "wb") as fh:
            fh.write(data)
        print("ENVMGR-SDIST " + file + " " + digest, flush=True)
        sys.exit(0)
sys.exit(f"no source distribution of {name}=={version} on the configured indexes")
'''

# The box's front end: runs as nobody, with no network; only the standard library and the build requirements.
BOX_SCRIPT = r'''
import importlib, importlib.metadata, os, re, sys, tarfile, tomllib, zipfile

sdist_dir, build_env, out = sys.argv[1:4]
mode = sys.argv[4] if len(sys.argv) > 4 else "wheel"   # "metadata": the project's METADATA only
os.makedirs("/tmp/src")
if os.path.isdir(os.path.join(sdist_dir, "project")):   # a method's own source folder, not an archive
    import shutil
    shutil.copytree(os.path.join(sdist_dir, "project"), "/tmp/src/project", symlinks=True)
else:
    (archive,) = [os.path.join(sdist_dir, n) for n in os.listdir(sdist_dir) if n.endswith((".tar.gz", ".zip"))]
    if archive.endswith(".zip"):
        zipfile.ZipFile(archive).extractall("/tmp/src")
    else:
        with tarfile.open(archive) as tf:
            try:
                tf.extractall("/tmp/src", filter="data")
            except TypeError:   # a Python without extraction filters: the box holds whatever it unpacks
                tf.extractall("/tmp/src")
(top,) = os.listdir("/tmp/src")
top = os.path.join("/tmp/src", top)
os.chdir(top)
system = {}
if os.path.isfile("pyproject.toml"):
    with open("pyproject.toml", "rb") as fh:
        system = tomllib.load(fh).get("build-system", {})
backend_name = system.get("build-backend", "setuptools.build_meta:__legacy__")
sys.path[:0] = [os.path.join(top, p) for p in system.get("backend-path", [])] + [build_env, top]
module, _, attribute = backend_name.partition(":")
backend = importlib.import_module(module)
for part in filter(None, attribute.split(".")):
    backend = getattr(backend, part)
installed = {re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower()
             for d in importlib.metadata.distributions(path=[build_env])}
asked = getattr(backend, "get_requires_for_build_wheel", lambda config_settings=None: [])()
missing = [r for r in asked if re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", r).group(0)).lower()
           not in installed]
if missing:
    sys.exit("its build backend asks for more than its [build-system] requires: " + ", ".join(missing))
if mode == "metadata" and hasattr(backend, "prepare_metadata_for_build_wheel"):
    print("ENVMGR-METADATA " + backend.prepare_metadata_for_build_wheel(out), flush=True)
else:
    print("ENVMGR-BUILT " + backend.build_wheel(out), flush=True)
'''


def normal_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class BuiltWheel:
    name: str            # normalized
    version: str
    sdist_sha256: str
    path: Path           # in <cache>/built/

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


def allowed(spec: MethodSpec) -> set[str]:
    return {normal_name(name) for name in spec.adapt.build_from_source}


def build_requirements(sdist: Path) -> list[str]:
    """`[build-system] requires` of an sdist, read from the archive without unpacking it (setuptools by default)."""
    data: bytes | None = None
    if sdist.name.endswith(".zip"):
        with zipfile.ZipFile(sdist) as zf:
            names = [n for n in zf.namelist() if n.count("/") == 1 and n.endswith("/pyproject.toml")]
            data = zf.read(names[0]) if names else None
    else:
        with tarfile.open(sdist) as tf:
            member = next((m for m in tf.getmembers() if m.isfile() and m.name.count("/") == 1
                           and m.name.endswith("/pyproject.toml")), None)
            extracted = tf.extractfile(member) if member is not None else None
            data = extracted.read() if extracted is not None else None
    return _requires(data, sdist.name)


def _requires(data: bytes | None, where: str) -> list[str]:
    """`[build-system] requires` from a pyproject.toml's bytes (None: no pyproject.toml, setuptools)."""
    try:
        system = tomllib.loads(data.decode("utf-8")).get("build-system", {}) if data else {}
    except (tomllib.TOMLDecodeError, UnicodeDecodeError):
        raise EnvmgrError(f"{where}: its pyproject.toml is not valid TOML") from None
    requires = system.get("requires", DEFAULT_BUILD_SYSTEM["requires"] if not system else [])
    if not isinstance(requires, list) or not all(isinstance(r, str) and "\n" not in r for r in requires):
        raise EnvmgrError(f"{where}: [build-system] requires is not a list of requirements")
    backend = system.get("build-backend", DEFAULT_BUILD_SYSTEM["build-backend"])
    if str(backend).startswith("setuptools") and not any(normal_name(r).startswith("wheel") for r in requires):
        requires = [*requires, "wheel"]   # older setuptools ask for it at build time
    return list(requires)


def _fetch_build_requirements(ctx: Context, spec: MethodSpec, base: BaseImage, work: Path, requires: list[str],
                              env: dict[str, str], what: str) -> None:
    """uv installs the build requirements, wheels only, into work/build-env: a download step, no package code."""
    if not requires:
        return
    (work / "build-requirements.txt").write_text("".join(r + "\n" for r in requires))
    run_step(ctx, base, f"downloading {what}'s build requirements (wheels only)",
             f"{paths.CONTAINER_UV} pip install --quiet --python {base.python} --target "
             f"{paths.CONTAINER_WORK}/build-env -r {paths.CONTAINER_WORK}/build-requirements.txt",
             [BindMount(work, paths.CONTAINER_WORK, read_only=False), *uv_mounts(ctx)], env, method=spec.name)


@contextlib.contextmanager
def _box_folders(ctx: Context, prefix: str) -> Iterator[tuple[Path, Path, Path, Path]]:
    """A work folder for one box: (work, what is built from, its build requirements, its one writable folder)."""
    work_root = ctx.cache_dir / "work"
    work_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work_root, prefix=prefix) as work_name:
        work = Path(work_name)
        folders = (work / "sdist", work / "build-env", work / "out")
        for folder in folders:
            folder.mkdir()
        yield (work, *folders)


def _box(ctx: Context, spec: MethodSpec, base: BaseImage, title: str, sdist_dir: Path, build_env: Path, out: Path,
         mode: str = "wheel") -> list[str]:
    """Run the PEP 517 front end in the box: no network, no credentials, nobody, one writable folder."""
    (sdist_dir / ".box.py").write_text(BOX_SCRIPT)
    for folder in (sdist_dir, build_env):
        os.chmod(folder, 0o755)
    os.chmod(out, 0o777)   # the box's user owns nothing on the host; this folder alone it may write
    box = Step(title=title, image=base.image_id, network="none", user=BOX_USER, method=spec.name, target=base.tag,
               script=f"{base.python} -I -B {CONTAINER_SDIST}/.box.py {CONTAINER_SDIST} "
                      f"{CONTAINER_BUILD_ENV} {CONTAINER_OUT} {mode}",
               env={"HOME": "/tmp", "TMPDIR": "/tmp", "SOURCE_DATE_EPOCH": "315532800", "PYTHONHASHSEED": "0"},
               mounts=[BindMount(sdist_dir, CONTAINER_SDIST, read_only=True),
                       BindMount(build_env, CONTAINER_BUILD_ENV, read_only=True),
                       BindMount(out, CONTAINER_OUT, read_only=False)])
    with ctx.ui.progress(box.title, total=1, unit="steps") as task:
        lines = ctx.step_runner(ctx, box, None)
        task.advance(1)
    return list(lines or [])


PROJECT_FILES = ("pyproject.toml", "setup.py", "setup.cfg")


def project_requirements(ctx: Context, spec: MethodSpec, base: BaseImage, extra_indexes: list[str]) -> list[str]:
    """The dependencies of a project whose metadata only its build backend knows (setup.py, or
    `dynamic = ["dependencies"]`): the backend runs in the box (no network, no credentials, nobody), its
    `prepare_metadata_for_build_wheel` (or a wheel) is read, and Requires-Dist without extras is returned."""
    source = spec.source_path
    pyproject = source / "pyproject.toml"
    requires = _requires(pyproject.read_bytes() if pyproject.is_file() else None, str(pyproject))
    with _box_folders(ctx, f"metadata-{spec.name}-") as (work, sdist_dir, build_env, out):
        shutil.copytree(source, sdist_dir / "project", symlinks=True,
                        ignore=shutil.ignore_patterns(".git", "__pycache__", ".venv", "node_modules"))
        _fetch_build_requirements(ctx, spec, base, work, requires, uv_step_env(ctx, extra_indexes),
                                  f"{spec.name}'s project")
        _box(ctx, spec, base, f"reading {spec.name}'s dependencies from its build backend (no network, "
             "no credentials)", sdist_dir, build_env, out, mode="metadata")
        return _requires_dist(out, spec.name)


def _requires_dist(out: Path, method: str) -> list[str]:
    """Requires-Dist of the METADATA (or the wheel) the box left in `out`, without extras' requirements."""
    import email.parser

    metadata = [p for p in out.glob("*.dist-info/METADATA") if not p.is_symlink() and p.is_file()]
    text = metadata[0].read_text(encoding="utf-8", errors="replace") if len(metadata) == 1 else None
    wheels = [p for p in out.glob("*.whl") if not p.is_symlink() and p.is_file()]
    if text is None and len(wheels) == 1:
        with zipfile.ZipFile(wheels[0]) as zf:
            names = [n for n in zf.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA")]
            text = zf.read(names[0]).decode("utf-8", errors="replace") if len(names) == 1 else None
    if text is None:
        raise EnvmgrError(f"{method}: its build backend left no metadata "
                          f"({', '.join(sorted(p.name for p in out.iterdir())) or 'nothing'})")
    found = email.parser.Parser().parsestr(text).get_all("Requires-Dist") or []
    wanted = []
    for requirement in found:
        marker = requirement.split(";", 1)[1] if ";" in requirement else ""
        if not re.search(r"\bextra\s*==", marker) and "\n" not in requirement:
            wanted.append(requirement.strip())
    return wanted


def _built_dir(ctx: Context, base: BaseImage, sdist_sha256: str) -> Path:
    return ctx.cache_dir / "built" / f"{sdist_sha256}-{base.diff_id.split(':')[-1][:12]}"


def cached(ctx: Context, base: BaseImage, name: str, version: str, sdist_sha256: str) -> BuiltWheel | None:
    folder = _built_dir(ctx, base, sdist_sha256)
    for wheel in sorted(folder.glob("*.whl")) if folder.is_dir() else []:
        return BuiltWheel(normal_name(name), version, sdist_sha256, wheel)
    return None


def build(ctx: Context, spec: MethodSpec, base: BaseImage, name: str, version: str,
          extra_indexes: list[str], want: list[str] | None = None) -> BuiltWheel:
    """The wheel of `name`==`version` built from its sdist in the box (or the one built before from that sdist).

    `want`: the sha256 values the lock allows for the sdist (None at lock time: the index's own is checked).
    """
    for sha in want or []:
        built = cached(ctx, base, name, version, sha)
        if built is not None:
            return built
    with _box_folders(ctx, f"sdist-{normal_name(name)}-") as (work, sdist_dir, build_env, out):
        (work / "fetch.py").write_text(FETCH_SCRIPT)
        env = uv_step_env(ctx, extra_indexes)
        lines = run_step(ctx, base, f"downloading {name} {version}'s source distribution",
                         f"{base.python} -I -S {paths.CONTAINER_WORK}/fetch.py {shlex.quote(name)} "
                         f"{shlex.quote(version)} {shlex.quote(','.join(want or []))} {paths.CONTAINER_WORK}/sdist",
                         [BindMount(work, paths.CONTAINER_WORK, read_only=False)], env, method=spec.name)
        found = [line[len(SDIST_MARK):].split() for line in lines if line.startswith(SDIST_MARK)]
        if not found or len(found[-1]) != 2:
            raise EnvmgrError(f"{spec.name}: no source distribution of {name}=={version} was downloaded")
        file_name, sdist_sha256 = found[-1]
        sdist = sdist_dir / file_name
        if hashlib.sha256(sdist.read_bytes()).hexdigest() != sdist_sha256:
            raise EnvmgrError(f"{spec.name}: {file_name} changed after its download")
        _fetch_build_requirements(ctx, spec, base, work, build_requirements(sdist), env, f"{name} {version}")
        _box(ctx, spec, base, f"building {name} {version} from its source distribution (no network, no credentials)",
             sdist_dir, build_env, out)
        wheels = [p for p in out.iterdir()
                  if not p.is_symlink() and p.is_file() and _is_wheel_of(p.name, name, version)]
        if len(wheels) != 1:
            raise EnvmgrError(f"{spec.name}: building {name} {version} from its sdist gave no wheel of that name "
                              f"and version ({', '.join(sorted(p.name for p in out.iterdir())) or 'nothing'})")
        folder = _built_dir(ctx, base, sdist_sha256)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / wheels[0].name
        shutil.copyfile(wheels[0], target.with_name(target.name + ".partial"))
        os.replace(target.with_name(target.name + ".partial"), target)
        shutil.rmtree(out, ignore_errors=True)
        return BuiltWheel(normal_name(name), version, sdist_sha256, target)


def _is_wheel_of(file_name: str, name: str, version: str) -> bool:
    parts = file_name[:-4].split("-") if file_name.endswith(".whl") else []
    return len(parts) in (5, 6) and normal_name(parts[0]) == normal_name(name) and parts[1] == version


def exact_version(spec: MethodSpec, name: str, requirements: str = "") -> str:
    """The version a build_from_source package is built at: its [adapt] pin, else an exact `==` requirement."""
    for pinned, version in spec.adapt.pin.items():
        if normal_name(pinned) == normal_name(name):
            return version
    for line in requirements.splitlines():
        match = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([A-Za-z0-9.+!_-]+)\s*(?:[;#\\]|$)", line)
        if match and normal_name(match.group(1)) == normal_name(name):
            return match.group(2)
    raise UsageError(f"{spec.folder / 'envmgr.toml'}: key 'adapt.build_from_source': {name} is built from source "
                     "at one exact version, and none is pinned",
                     hint=f"pin it: [adapt] pin = {{ \"{name}\" = \"VERSION\" }}")


def build_for_lock(ctx: Context, spec: MethodSpec, base: BaseImage, extra_indexes: list[str],
                   requirements: str = "") -> list[BuiltWheel]:
    """Every package the method allows, built at its pinned version (the lock finds their wheels)."""
    return [build(ctx, spec, base, name, exact_version(spec, name, requirements), extra_indexes)
            for name in spec.adapt.build_from_source]


def stage_for_lock(built: list[BuiltWheel], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for wheel in built:
        shutil.copyfile(wheel.path, folder / wheel.path.name)
    os.chmod(folder, 0o755)


def record_sdist_hashes(lock: str, built: list[BuiltWheel]) -> str:
    """A hashed requirements lock with each built package's hashes replaced by its sdist's alone."""
    for wheel in built:
        pattern = re.compile(rf"^({re.escape(wheel.name)}==\S+)( \\\n[ \t]+--hash=\S+)+$", re.M | re.I)
        only_sdist = f" \\\n    --hash=sha256:{wheel.sdist_sha256}"
        lock, count = pattern.subn(lambda match: match.group(1) + only_sdist, lock)  # noqa: B023 - used at once
        if count != 1:
            raise EnvmgrError(f"the lock has no hashed entry for {wheel.name}, built from its source distribution")
    return lock


def with_built_wheels(ctx: Context, spec: MethodSpec, base: BaseImage, entries: list[str],
                      extra_indexes: list[str]) -> tuple[list[str], list[str]]:
    """The install's entries with each allowed sdist replaced by its box-built wheel (hash-pinned), and the
    index that serves those wheels added; other entries as they are (uv refuses an sdist)."""
    names = allowed(spec)
    if not names:
        return entries, extra_indexes
    result = []
    served = False
    for entry in entries:
        joined = " ".join(line.strip().rstrip("\\") for line in entry.splitlines())
        match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", joined)
        if not match or normal_name(match.group(1)) not in names:
            result.append(entry)
            continue
        hashes = [h.split(":", 1)[-1] for h in re.findall(r"--hash[= ]\s*(\S+)", joined)]
        wheel = build(ctx, spec, base, match.group(1), match.group(2), extra_indexes, want=hashes)
        result.append(f"{wheel.name}=={wheel.version} \\\n    --hash=sha256:{wheel.sha256}")
        served = True
    return result, ([*extra_indexes, built_index(ctx.cache_dir / "built")] if served else extra_indexes)


_SERVERS: dict[Path, str] = {}
_SERVERS_LOCK = threading.Lock()


def built_index(root: Path) -> str:
    """A PEP 503 index of the wheels under `root` on 127.0.0.1 (steps use the host's network), for this process."""
    root = root.resolve()
    with _SERVERS_LOCK:
        if root in _SERVERS:
            return _SERVERS[root]

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - the http.server name
                parts = [p for p in self.path.split("?")[0].split("/") if p]
                wheels = sorted(p for p in root.glob("*/*.whl") if p.is_file())
                body: bytes | None = None
                if len(parts) == 2 and parts[0] == "simple":
                    links = [f'<a href="/files/{w.parent.name}/{w.name}#sha256='
                             f'{hashlib.sha256(w.read_bytes()).hexdigest()}">{w.name}</a>'
                             for w in wheels if normal_name(w.name.split("-")[0]) == normal_name(parts[1])]
                    body = ("<html><body>\n" + "\n".join(links) + "\n</body></html>\n").encode() if links else None
                    kind = "text/html"
                elif len(parts) == 3 and parts[0] == "files":
                    match = [w for w in wheels if w.parent.name == parts[1] and w.name == parts[2]]
                    body = match[0].read_bytes() if match else None
                    kind = "application/octet-stream"
                if body is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True, name="envmgr-built-wheels").start()
        _SERVERS[root] = f"http://127.0.0.1:{server.server_address[1]}/simple/"
        return _SERVERS[root]

