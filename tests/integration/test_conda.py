"""Conda methods against a real engine and a real conda channel served over HTTP on 127.0.0.1.

The channel (tests/support/conda_channel.py) is built here from small real packages (.conda and
.tar.bz2, noarch and per platform, prefix placeholders, an activation script, one needing
__cuda) and indexed with py-rattler. It is served twice: mirror A (open) and mirror B (behind a
password). Locks are made through A, images built through B; neither may appear in a lock.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.support.conda_channel import CHANNEL, Channel, build_channel, build_example_wheels
from tests.support.pypi import Index
from tests.support.said import error_lines

pytestmark = pytest.mark.engine

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "envs" / "conda-demo"
SECRET = "s3cret-Channel-Pass"

SPEC = """\
name = "{name}"
backend = "conda"
entry = ["python", "main.py"]
gpu = "none"
platforms = ["linux-64", "linux-aarch64"]
"""

ENVIRONMENT = f"""\
channels:
  - {CHANNEL}
dependencies:
  - python 3.11.*
  - hello-tool >=1.0
  - greet-py
  - pip:
    - envmgr-alpha>=1.0
"""

MAIN = """\
import os, subprocess, sys
import envmgr_alpha, greet_py
print(envmgr_alpha.GREETING, greet_py.MESSAGE, os.environ.get("HELLO_TOOL_HOME"), sys.prefix)
print(subprocess.run(["hello-tool"], capture_output=True, text=True).stdout.strip())
"""


@pytest.fixture(scope="module")
def channel_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("conda-channel")
    build_channel(root)
    return root


@pytest.fixture(scope="module")
def channel_a(channel_root):
    served = Channel(channel_root).start()
    yield served
    served.stop()


@pytest.fixture(scope="module")
def channel_b(channel_root):
    served = Channel(channel_root, username="builder", password=SECRET).start()
    yield served
    served.stop()


@pytest.fixture(scope="module")
def example_wheels(tmp_path_factory) -> Path:
    return build_example_wheels(tmp_path_factory.mktemp("conda-wheels"))


@pytest.fixture(scope="module")
def pypi_a(example_wheels):
    index = Index(example_wheels).start()
    yield index
    index.stop()


@pytest.fixture(scope="module")
def pypi_b(example_wheels):
    index = Index(example_wheels, username="builder", password=SECRET).start()
    yield index
    index.stop()


class CondaWorkspace:
    def __init__(self, tmp_path: Path, store: Path, name: str = "ctiny"):
        self.base_dir = tmp_path / "base"
        self.cache_dir = tmp_path / "cache"
        self.store = store
        self.name = name
        self.method_dir = self.base_dir / "methods" / name
        self.config = tmp_path / "config.toml"
        self.config.write_text("")

    def write(self, environment: str = ENVIRONMENT, spec: str | None = None) -> None:
        self.method_dir.mkdir(parents=True, exist_ok=True)
        (self.method_dir / "envmgr.toml").write_text(spec or SPEC.format(name=self.name))
        (self.method_dir / "environment.yml").write_text(environment)
        (self.method_dir / "main.py").write_text(MAIN)

    def mirrors(self, channel: Channel | None, pypi=None) -> None:
        lines = ["[mirrors]"]
        if channel is not None:
            lines.append(f'channels = {{ "{CHANNEL}" = "{channel.url}" }}')
        if pypi is not None:
            lines.append(f'pypi = "{pypi.url}"')
        self.config.write_text("\n".join(lines) + "\n")

    def envmgr(self, *args: str, check: bool = True):
        env = {k: v for k, v in os.environ.items() if not k.startswith("ENVMGR_")}
        env.update(ENVMGR_BASE_DIR=str(self.base_dir), ENVMGR_CACHE_DIR=str(self.cache_dir),
                   ENVMGR_STORE_DIR=str(self.store), ENVMGR_CONFIG=str(self.config))
        proc = subprocess.run([sys.executable, "-m", "envmgr", *args], capture_output=True, text=True, env=env,
                              cwd=REPO, timeout=900)
        if check and proc.returncode != 0:
            raise AssertionError(f"envmgr {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    @property
    def lock_path(self) -> Path:
        return self.method_dir / "conda-lock.yml"


@pytest.fixture
def conda_ws(tmp_path, store, engine):
    ws = CondaWorkspace(tmp_path, store)
    yield ws
    for image in engine.images.list(name=f"envmgr/{ws.name}"):
        try:
            engine.images.remove(image.id, force=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
    shutil.rmtree(ws.cache_dir, ignore_errors=True)


def _done(proc) -> dict:
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return [e for e in events if e.get("event") == "done"][-1]


def _assert_canonical_lock(path: Path, mirrors: list[Channel]):
    from conda_lock.lockfile import parse_conda_lock_file

    text = path.read_text()
    for mirror in mirrors:
        assert f"127.0.0.1:{mirror.port}" not in text
    assert "127.0.0.1" not in text and SECRET not in text and "builder" not in text
    lock = parse_conda_lock_file(path)
    assert set(lock.metadata.platforms) == {"linux-64", "linux-aarch64"}
    conda = [p for p in lock.package if p.manager == "conda"]
    assert conda and all(len(p.hash.md5) == 32 and len(p.hash.sha256) == 64 for p in conda)
    assert all(p.url.startswith("https://") and f"/{CHANNEL}/{p.url.split('/')[-2]}/" in p.url for p in conda)
    pip = [p for p in lock.package if p.manager == "pip"]
    assert pip and all(len(p.hash.sha256) == 64 for p in pip)
    return lock


def test_lock_via_a_build_via_b_no_mirror_anywhere(conda_ws, engine, channel_a, channel_b, pypi_a, pypi_b):
    conda_ws.write()
    conda_ws.mirrors(channel_a, pypi_a)
    conda_ws.envmgr("lock", conda_ws.name)
    lock = _assert_canonical_lock(conda_ws.lock_path, [channel_a, channel_b])
    pins = {(p.platform, p.name): p for p in lock.package}
    assert pins[("linux-64", "hello-tool")].url.endswith(".conda")             # one format per platform
    assert pins[("linux-aarch64", "hello-tool")].url.endswith(".tar.bz2")
    assert pins[("linux-64", "greet-data")].url.split("/")[-2] == "noarch"
    assert pins[("linux-64", "envmgr-beta")].version == "1.1"                  # pip deps resolved too
    assert any("/linux-aarch64/" in r for r in channel_a.requests), "aarch64 was not solved through mirror A"
    assert conda_ws.envmgr("lock", conda_ws.name, "--check").returncode == 0

    conda_ws.mirrors(channel_b, pypi_b)
    a_before = len(channel_a.requests)
    built = conda_ws.envmgr("--json", "build", conda_ws.name)
    first = _done(built)
    assert not first["reused"] and len(channel_a.requests) == a_before
    assert any(r.endswith(".conda") for r in channel_b.requests), "packages were not fetched through mirror B"
    assert SECRET not in built.stdout + built.stderr

    # The image's default command activates the env (activate.d) and runs the entry in it.
    out = engine.containers.run(first["tag"], remove=True, network_mode="none").decode()
    prefix = f"/opt/envmgr/envs/{conda_ws.name}"
    assert out.splitlines()[0].split() == ["alpha+beta-1.1", "greet-py", "(noarch:", "python)",
                                           f"{prefix}/share/greet", prefix]
    assert out.splitlines()[1] == (f"hello-tool 1.1 (linux-64) from {prefix}: greetings installed in {prefix}")
    shim = engine.containers.run(first["tag"], ["conda", "run", "-n", conda_ws.name, "sh", "-c",
                                                "echo $HELLO_TOOL_HOME"], remove=True, network_mode="none")
    shim = shim.decode().strip()
    assert shim == f"{prefix}/share/greet"

    # No mirror, credential or host cache path in any layer or label.
    archive = io.BytesIO()
    for chunk in engine.images.get(first["image"]).save():
        archive.write(chunk)
    archive.seek(0)
    with tarfile.open(fileobj=archive) as outer:
        for member in outer.getmembers():
            if member.isfile():
                data = outer.extractfile(member).read()
                for needle in (SECRET.encode(), f"127.0.0.1:{channel_b.port}".encode(),
                               str(conda_ws.cache_dir).encode()):
                    assert needle not in data, f"{needle!r} found in {member.name}"

    again = _done(conda_ws.envmgr("--json", "build", conda_ws.name))
    assert again["reused"] and again["image"] == first["image"] and again["seconds"] < 2.5

    # Clean caches, no image: the same image ID.
    engine.images.remove(first["image"], force=True)
    shutil.rmtree(conda_ws.cache_dir)
    rebuilt = _done(conda_ws.envmgr("--json", "build", conda_ws.name))
    assert not rebuilt["reused"] and rebuilt["image"] == first["image"]


def test_conda_env_with_poetry_lock(conda_ws, engine, channel_a, pypi_a):
    """The conda env provides the interpreter, poetry.lock the Python packages, in one prefix."""
    environment = f"channels:\n  - {CHANNEL}\ndependencies:\n  - python 3.11.*\n  - hello-tool\n"
    conda_ws.write(environment)
    (conda_ws.method_dir / "pyproject.toml").write_text(
        '[project]\nname = "ctiny"\nversion = "0.1.0"\nrequires-python = ">=3.11,<3.12"\n'
        'dependencies = ["envmgr-alpha>=1.0"]\n\n[tool.poetry]\npackage-mode = false\n')
    (conda_ws.method_dir / "main.py").write_text(
        "import os, sys, envmgr_alpha\nprint(envmgr_alpha.GREETING, os.environ['HELLO_TOOL_HOME'], sys.executable)\n")
    conda_ws.mirrors(channel_a, pypi_a)
    locked = conda_ws.envmgr("lock", conda_ws.name)
    assert "conda-lock.yml" in locked.stdout + locked.stderr and "poetry.lock" in locked.stdout + locked.stderr
    assert (conda_ws.method_dir / "poetry.lock").is_file()
    conda_ws.envmgr("lock", conda_ws.name, "--check")
    first = _done(conda_ws.envmgr("--json", "build", conda_ws.name))
    out = engine.containers.run(first["tag"], remove=True, network_mode="none").decode().split()
    prefix = f"/opt/envmgr/envs/{conda_ws.name}"
    assert out == ["alpha+beta-1.1", f"{prefix}/share/greet", f"{prefix}/bin/python"]

    # pyproject.toml changed: the lock is stale (exit 3) until `envmgr lock`.
    pyproject = conda_ws.method_dir / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"envmgr-alpha>=1.0"', '"envmgr-alpha>=1.0", "envmgr-beta"'))
    stale = conda_ws.envmgr("build", conda_ws.name, check=False)
    assert stale.returncode == 3 and f"envmgr lock {conda_ws.name}" in stale.stderr


def test_bad_input_gives_one_clear_line(conda_ws, channel_a, pypi_a):
    conda_ws.mirrors(channel_a, pypi_a)

    # Unsolvable: hello-tool needs greet-data >=1.0.
    conda_ws.write(f"channels: [{CHANNEL}]\ndependencies:\n  - hello-tool\n  - greet-data <1\n")
    proc = conda_ws.envmgr("lock", conda_ws.name, check=False)
    assert proc.returncode == 1
    assert "cannot be solved" in proc.stderr and "hello-tool" in proc.stderr and "greet-data" in proc.stderr
    assert not conda_ws.lock_path.exists()

    # A package that exists for linux-64 only.
    conda_ws.write(f"channels: [{CHANNEL}]\ndependencies:\n  - hello-tool\n  - x86-only\n")
    proc = conda_ws.envmgr("lock", conda_ws.name, check=False)
    assert proc.returncode == 1 and "linux-aarch64" in proc.stderr and "x86-only" in proc.stderr

    # __cuda: unsolvable unless the spec declares the virtual package.
    conda_ws.write(f"channels: [{CHANNEL}]\ndependencies:\n  - cuda-kernels\n",
                   spec=SPEC.format(name=conda_ws.name).replace('platforms = ["linux-64", "linux-aarch64"]', ""))
    proc = conda_ws.envmgr("lock", conda_ws.name, check=False)
    assert proc.returncode == 1 and "__cuda" in proc.stderr
    (conda_ws.method_dir / "envmgr.toml").write_text(SPEC.format(name=conda_ws.name).replace(
        'platforms = ["linux-64", "linux-aarch64"]', '[virtual_packages]\n__cuda = "12.4"'))
    conda_ws.envmgr("lock", conda_ws.name)
    assert "cuda-kernels-1.0" in conda_ws.lock_path.read_text()

    # A stale lock: environment.yml changed since.
    (conda_ws.method_dir / "environment.yml").write_text(
        f"channels: [{CHANNEL}]\ndependencies:\n  - cuda-kernels\n  - hello-tool\n")
    for verb in (["lock", conda_ws.name, "--check"], ["build", conda_ws.name]):
        proc = conda_ws.envmgr(*verb, check=False)
        assert proc.returncode == 3 and f"run `envmgr lock {conda_ws.name}`" in proc.stderr
        assert "environment.yml" in proc.stderr

    # Malformed environment.yml: the line is named.
    (conda_ws.method_dir / "environment.yml").write_text(
        f"channels:\n  - {CHANNEL}\ndependencies:\n  - hello-tool\n  - [oops\n")
    proc = conda_ws.envmgr("lock", conda_ws.name, check=False)
    assert proc.returncode == 2 and "environment.yml:" in proc.stderr and "not valid YAML" in proc.stderr
    (conda_ws.method_dir / "environment.yml").write_text(
        f"channels:\n  - {CHANNEL}\ndependencies:\n  - hello-tool\n  - numpy >>>1\n")
    proc = conda_ws.envmgr("lock", conda_ws.name, check=False)
    assert proc.returncode == 2 and "environment.yml:5:" in proc.stderr and "numpy >>>1" in proc.stderr
    assert len(error_lines(proc.stderr)) == 1


def test_mirror_down_or_serving_other_bytes_fails_the_build(conda_ws, engine, channel_root, channel_a, pypi_a):
    conda_ws.write(f"channels: [{CHANNEL}]\ndependencies:\n  - hello-tool\n")
    conda_ws.mirrors(channel_a, pypi_a)
    conda_ws.envmgr("lock", conda_ws.name)

    # A mirror that serves a different file than the locked one.
    corrupt = Channel(channel_root, corrupt={"hello-tool-1.1-hafe0c462_0.conda"}).start()
    try:
        conda_ws.mirrors(corrupt, pypi_a)
        proc = conda_ws.envmgr("build", conda_ws.name, check=False)
    finally:
        corrupt.stop()
    assert proc.returncode == 5, proc.stderr
    assert "hello-tool 1.1" in proc.stderr and f"127.0.0.1:{corrupt.port}" in proc.stderr
    assert "hash" in proc.stderr
    assert not engine.images.list(name=f"envmgr/{conda_ws.name}")

    # A mirror that is down.
    conda_ws.mirrors(corrupt, pypi_a)   # stopped now: nothing listens on its port
    proc = conda_ws.envmgr("build", conda_ws.name, check=False)
    assert proc.returncode == 5, proc.stderr
    assert f"127.0.0.1:{corrupt.port}" in proc.stderr and "could not be fetched" in proc.stderr
    assert not engine.images.list(name=f"envmgr/{conda_ws.name}")


def test_committed_example_is_current_relocks_identically_and_runs(tmp_path, store, engine, channel_a, channel_b,
                                                                    pypi_a, pypi_b):
    """envs/conda-demo/conda-lock.yml: current, parseable, canonical, what a fresh lock writes, and it builds."""
    ws = CondaWorkspace(tmp_path, store, name="conda-demo-relock")
    shutil.copytree(EXAMPLE, ws.method_dir, ignore=shutil.ignore_patterns("conda-lock.yml"))
    spec = ws.method_dir / "envmgr.toml"
    spec.write_text(spec.read_text().replace('name = "conda-demo"', f'name = "{ws.name}"'))
    ws.mirrors(channel_a, pypi_a)
    ws.envmgr("lock", ws.name)
    if os.environ.get("ENVMGR_UPDATE_EXAMPLE"):
        shutil.copyfile(ws.lock_path, EXAMPLE / "conda-lock.yml")
    assert ws.lock_path.read_text() == (EXAMPLE / "conda-lock.yml").read_text()
    assert ws.envmgr("lock", "conda-demo", "--check").returncode == 0
    _assert_canonical_lock(EXAMPLE / "conda-lock.yml", [channel_a])

    ws.mirrors(channel_b, pypi_b)
    built = _done(ws.envmgr("--json", "build", "conda-demo"))
    try:
        out = engine.containers.run(built["tag"], remove=True, network_mode="none").decode().splitlines()
    finally:
        for image in engine.images.list(name="envmgr/conda-demo"):
            engine.images.remove(image.id, force=True)
    assert out[0] == "python 3.11.2 in /opt/envmgr/envs/conda-demo"
    assert out[1:4] == ["pip package: alpha+beta-1.1", "conda noarch package: greet-py (noarch: python)",
                        "activation script: HELLO_TOOL_HOME=/opt/envmgr/envs/conda-demo/share/greet"]
    assert out[4].startswith("hello-tool 1.1 (linux-64) from /opt/envmgr/envs/conda-demo")


def test_an_sdist_in_the_pip_section_is_refused_without_running_it(conda_ws, channel_a, tmp_path):
    """uv resolves the `pip:` section on the host: an sdist's build backend would run there, as the invoking user."""
    import uuid

    from tests.integration.test_sdist_box import Listener, _sdist

    listener = Listener()
    root = tmp_path / "index"
    root.mkdir()
    _sdist(root, listener.port, uuid.uuid4().hex[:12])
    index = Index(root, sdists=True).start()
    try:
        conda_ws.write(ENVIRONMENT.replace("envmgr-alpha>=1.0", "hostile==0.1"))
        conda_ws.mirrors(channel_a, index)
        proc = conda_ws.envmgr("lock", conda_ws.name, check=False)
    finally:
        index.stop()
        listener.close()
    assert listener.received == [], "the sdist's build backend ran on the host while locking"
    assert proc.returncode == 1, proc.stderr
    assert "hostile==0.1 has only a source distribution" in proc.stderr, proc.stderr
