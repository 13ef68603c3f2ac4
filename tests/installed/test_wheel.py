"""envmgr as an admin installs it: from the wheelhouse `make dist` writes, with no index, into a fresh venv
outside the checkout, run from a folder outside it. It must find its built-in methods and base images,
and compute the same inputs hashes (so the same image tags and IDs) as the checkout.

`make test-installed` passes the wheelhouse it just built (ENVMGR_WHEELHOUSE); run alone, the test builds one.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).with_name("probe.py")


def _run(argv: list, cwd: Path, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ENVMGR_", "PYTHON", "VIRTUAL_ENV"))}
    env.update({"ENVMGR_CONFIG": "/dev/null", "PIP_CONFIG_FILE": "/dev/null", **kw.pop("env", {})})
    proc = subprocess.run([str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(map(str, argv))} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory) -> Path:
    given = os.environ.get("ENVMGR_WHEELHOUSE")
    if given:
        return Path(given)
    out = tmp_path_factory.mktemp("wheelhouse")
    subprocess.run([sys.executable, REPO / "tools" / "wheelhouse.py", out], check=True, timeout=900)
    return out


@pytest.fixture(scope="module")
def installed(wheelhouse, tmp_path_factory) -> Path:
    """A fresh venv with envmgr installed from the wheelhouse alone (no index, no host pip config)."""
    root = tmp_path_factory.mktemp("installed")
    assert not root.resolve().is_relative_to(REPO)
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", venv], cwd=root)
    _run([venv / "bin" / "python", "-m", "pip", "install", "-q", "--no-index", "--find-links", wheelhouse,
          "-r", wheelhouse / "requirements.txt"], cwd=root)
    return venv


@pytest.fixture(scope="module")
def elsewhere(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("elsewhere")


def _done(proc: subprocess.CompletedProcess) -> dict:
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return [e for e in events if e.get("event") == "done"][-1]


def _probe(python: Path, cwd: Path) -> dict:
    return json.loads(_run([python, "-I", PROBE], cwd=cwd).stdout)


def test_wheel_carries_the_builtin_methods_with_their_executable_bits_and_no_caches(wheelhouse):
    wheel = next(wheelhouse.glob("envmgr-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        modes = {info.filename: info.external_attr >> 16 for info in zf.infolist()}
    data = "envmgr/_builtin/"
    assert data + "envs/sd-demo/envmgr.toml" in modes and data + "images/bookworm-py311/image.toml" in modes
    assert data + "envs/sd-demo/poetry.lock" in modes and data + "envs/conda-demo/conda-lock.yml" in modes
    assert modes[data + "envs/sd-demo/train.sh"] & stat.S_IXUSR
    assert not modes[data + "envs/sd-demo/envmgr.toml"] & 0o111
    assert not [n for n in modes if "__pycache__" in n or n.endswith(".pyc") or "/bench/results" in n]
    assert "envmgr/_build.json" in modes


def test_installed_envmgr_lists_and_shows_builtin_methods_outside_the_checkout(installed, elsewhere):
    envmgr = installed / "bin" / "envmgr"
    base_dir = elsewhere / "base"
    listed = json.loads(_run([envmgr, "--json", "list"], cwd=elsewhere, env={"ENVMGR_BASE_DIR": str(base_dir)})
                        .stdout.splitlines()[-1])
    methods = {m["name"]: m for m in listed["methods"]}
    assert {"sd-demo", "conda-demo"} <= set(methods)
    site = installed.resolve()
    assert all(m["builtin"] and Path(m["folder"]).is_relative_to(site) for m in methods.values()), methods
    shown = json.loads(_run([envmgr, "--json", "show", "sd-demo"], cwd=elsewhere,
                            env={"ENVMGR_BASE_DIR": str(base_dir)}).stdout.splitlines()[-1])
    assert shown["lock"] == "current" and shown["packages"] > 50


def test_installed_inputs_hashes_equal_the_checkouts(installed, elsewhere):
    """Same inputs, same image: where envmgr is installed enters no hash (paths, modes, pyc left by pip)."""
    checkout = _probe(Path(sys.executable), elsewhere)
    wheel = _probe(installed / "bin" / "python", elsewhere)
    assert Path(checkout["envmgr"]).is_relative_to(REPO)
    assert Path(wheel["envmgr"]).is_relative_to(installed.resolve())
    for origin in wheel["origins"].values():
        assert origin.startswith("installed package data: " + str(installed.resolve()))
    assert set(wheel["methods"]) == set(checkout["methods"])
    for name, ours in wheel["methods"].items():
        assert ours["folder"] != checkout["methods"][name]["folder"]
        assert ours["inputs"] == checkout["methods"][name]["inputs"], name
        assert ours["tag"] == checkout["methods"][name]["tag"], name
    assert wheel["base_definition"] == checkout["base_definition"]


def test_installed_version_names_the_commit_it_was_built_from(installed, elsewhere):
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    said = _probe(installed / "bin" / "python", elsewhere)["version"]
    from envmgr import __version__

    # a tree that is no git checkout (a copied folder) builds a wheel that says so
    commit = git.stdout.strip()[:12] if git.returncode == 0 else "unknown"
    assert said.startswith(f"envmgr {__version__} (commit {commit}"), said


@pytest.mark.engine
def test_a_builtin_method_built_from_the_installed_wheel_has_the_checkouts_image_id(
        installed, elsewhere, tmp_path, store, engine):
    """conda-demo (built-in, small) from the checkout, its image removed, then from the installed wheel with a
    cache of its own: the method layer is made from the wheel's package data, and the image ID is the same."""
    from tests.support.conda_channel import CHANNEL, Channel, build_channel, build_example_wheels
    from tests.support.pypi import Index

    build_channel(tmp_path / "channel")
    (tmp_path / "wheels").mkdir()
    channel = Channel(tmp_path / "channel").start()
    pypi = Index(build_example_wheels(tmp_path / "wheels")).start()
    config = tmp_path / "config.toml"
    config.write_text(f'[mirrors]\nchannels = {{ "{CHANNEL}" = "{channel.url}" }}\npypi = "{pypi.url}"\n')

    def build(python: Path, cache: str) -> dict:
        env = {"ENVMGR_BASE_DIR": str(tmp_path / "base"), "ENVMGR_CACHE_DIR": str(tmp_path / cache),
               "ENVMGR_STORE_DIR": str(store), "ENVMGR_CONFIG": str(config)}
        return _done(_run([python, "-m", "envmgr", "--json", "build", "conda-demo"], cwd=elsewhere, env=env))

    try:
        checkout = build(Path(sys.executable), "cache-checkout")
        engine.images.remove(checkout["image"], force=True)
        wheel = build(installed / "bin" / "python", "cache-wheel")
        assert not wheel["reused"]
        assert (wheel["image"], wheel["tag"], wheel["inputs_hash"]) == \
            (checkout["image"], checkout["tag"], checkout["inputs_hash"])
    finally:
        channel.stop()
        pypi.stop()
        for image in engine.images.list(name="envmgr/conda-demo"):
            try:
                engine.images.remove(image.id, force=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
