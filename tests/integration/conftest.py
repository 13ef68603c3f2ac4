"""Integration tests: a real Docker Engine, real PEP 503 indexes on 127.0.0.1, real poetry and uv.

The base image and the lock tools are kept between runs in ENVMGR_TEST_STORE (a cache: the cold
path builds them); everything else a test makes (method images, containers, temp dirs) is removed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.engine import ensure_engine
from tests.support.pypi import Index, build_wheel

REPO = Path(__file__).resolve().parents[2]
STORE = Path(os.environ.get("ENVMGR_TEST_STORE", "/var/tmp/envmgr-test-store"))


ENGINE_RESTART_OPT_IN = "ENVMGR_TEST_ENGINE_RESTART"


def pytest_collection_modifyitems(config, items):
    """Tests that stop the machine's dockerd run only when asked for by name (`-m engine_restart`), alone, and
    only where the machine's owner opted in (ENVMGR_TEST_ENGINE_RESTART=1; .ci/run sets it): on a shared
    server `make test` must never stop the engine other people's work runs on."""
    if os.environ.get(ENGINE_RESTART_OPT_IN) != "1":
        skip = pytest.mark.skip(reason=f"stops and restarts this machine's dockerd: opt in with "
                                       f"{ENGINE_RESTART_OPT_IN}=1 (CI sets it)")
    elif "engine_restart" not in (config.getoption("markexpr") or ""):
        skip = pytest.mark.skip(reason="stops the machine's dockerd: run alone with `-m engine_restart`")
    else:
        return
    for item in items:
        if "engine_restart" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def engine():
    import docker

    ensure_engine()
    client = docker.from_env(timeout=900)
    yield client
    client.close()


@pytest.fixture(scope="session")
def store(engine) -> Path:
    """Base image + poetry tools, built once (through the host's inherited mirrors)."""
    from envmgr.core.config import load_config
    from envmgr.core.ui import Reporter
    from envmgr.door.context import Context
    from envmgr.images.base import ensure_base
    from envmgr.lock.backends.poetry import PoetryBackend

    STORE.mkdir(parents=True, exist_ok=True)
    os.environ["ENVMGR_STORE_DIR"] = str(STORE)
    ctx = Context(config=load_config({"cache_dir": str(STORE / "cache")}, files=[]), ui=Reporter("plain"))
    base = ensure_base(ctx, "bookworm-py311")
    PoetryBackend()._tools(ctx, base)
    return STORE


@pytest.fixture(scope="session")
def wheels(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wheels")
    # a .pth that imports a module at interpreter start, like setuptools' _distutils_hack: it must not
    # leave a timestamped pyc behind in the image
    build_wheel(root, "envmgr-alpha", "1.0", requires=["envmgr-beta>=1.0"],
                body='from envmgr_beta import NAME\nGREETING = "alpha+" + NAME\n',
                extra={"envmgr_alpha_hook.pth": "import envmgr_alpha_hook\n", "envmgr_alpha_hook.py": "HOOKED = 1\n"})
    build_wheel(root, "envmgr-beta", "1.0", body='NAME = "beta-1.0"\n')
    build_wheel(root, "envmgr-beta", "1.1", body='NAME = "beta-1.1"\n')
    build_wheel(root, "envmgr-gamma", "2.0", body='WINDOWS_ONLY = True\n')
    return root


@pytest.fixture(scope="session")
def mirror_a(wheels):
    index = Index(wheels).start()
    yield index
    index.stop()


@pytest.fixture(scope="session")
def mirror_b(wheels):
    """Same files as mirror A, behind a user:password (a credential that must never leak)."""
    index = Index(wheels, username="builder", password="s3cret-Mirror-Pass").start()
    yield index
    index.stop()


TINY_PYPROJECT = """\
[project]
name = "tiny"
version = "0.1.0"
requires-python = ">=3.11,<3.12"
dependencies = ["envmgr-alpha>=1.0", "envmgr-gamma>=2.0; sys_platform == 'win32'"]

[tool.poetry]
package-mode = false
"""

TINY_SPEC = """\
name = "tiny"
description = "fixture method: two small pure-Python packages"
backend = "poetry"
entry = ["python", "main.py"]
gpu = "none"

[env]
TINY_GREETING = "hello"
"""

TINY_MAIN = """\
import os, sys
import envmgr_alpha
print(envmgr_alpha.GREETING, os.environ.get("TINY_GREETING"), sys.prefix)
"""


@pytest.fixture
def workspace(tmp_path, store, engine):
    """A base dir with an added fixture method `tiny`, and a CLI runner bound to it."""
    base_dir = tmp_path / "base"
    method = base_dir / "methods" / "tiny"
    method.mkdir(parents=True)
    (method / "envmgr.toml").write_text(TINY_SPEC)
    (method / "pyproject.toml").write_text(TINY_PYPROJECT)
    (method / "main.py").write_text(TINY_MAIN)
    ws = Workspace(base_dir, tmp_path / "cache", store)
    yield ws
    ws.cleanup(engine)


class Workspace:
    def __init__(self, base_dir: Path, cache_dir: Path, store: Path):
        self.base_dir = base_dir
        self.cache_dir = cache_dir
        self.store = store
        self.method_dir = base_dir / "methods" / "tiny"

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ENVMGR_")}
        env.update(ENVMGR_BASE_DIR=str(self.base_dir), ENVMGR_CACHE_DIR=str(self.cache_dir),
                   ENVMGR_STORE_DIR=str(self.store), ENVMGR_CONFIG="/dev/null")
        env.update(extra)
        return env

    def envmgr(self, *args: str, mirror: str | None = None, check: bool = True, **extra: str):
        env = self.env(**extra)
        if mirror:
            env["ENVMGR_MIRRORS_PYPI"] = mirror
        proc = subprocess.run([sys.executable, "-m", "envmgr", *args], capture_output=True, text=True, env=env,
                              cwd=REPO, timeout=1800)
        if check and proc.returncode != 0:
            raise AssertionError(f"envmgr {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    def cleanup(self, engine) -> None:
        """Remove the images of the methods this workspace added (and their untagged leftovers).

        Only its own: on a shared engine another build's image is untagged between its load and its tag.
        """
        ours = {f"envmgr/{p.name}" for p in (self.base_dir / "methods").iterdir()} if (self.base_dir / "methods").is_dir() else set()
        for image in engine.images.list(filters={"label": "org.envmgr.method"}):
            labels = image.labels or {}
            method = f"envmgr/{labels.get('org.envmgr.method', '')}"
            variant = method in ours and "org.envmgr.variant" in labels   # tagged envmgr/<method>-<variant>
            if any(t.rsplit(":", 1)[0] in ours for t in image.tags) or (not image.tags and method in ours) \
                    or variant:
                try:
                    engine.images.remove(image.id, force=True)
                except Exception:  # noqa: BLE001 - already gone
                    pass
        subprocess.run(["rm", "-rf", str(self.cache_dir)], check=False)
