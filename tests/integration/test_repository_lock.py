"""A third-party poetry repository with a lock of its own (an extra +cu124 index, a git dependency): envmgr
adapts it on top of that lock, so every version the adaptation does not touch is the authors' version."""

from __future__ import annotations

import hashlib
import json
import tomllib
import zipfile
from pathlib import Path

import pytest
import tomli_w

from tests.support.pypi import Index, build_wheel

pytestmark = pytest.mark.engine

DECLARED = "https://download.example.invalid/whl/cu124"
GIT = "https://git.example.invalid/gitdep.git"

PYPROJECT = f"""\
[tool.poetry]
name = "third-trainer"
version = "0.3.0"
description = "someone else's training code, with its own lock"
authors = ["Someone <someone@example.invalid>"]
package-mode = false

[tool.poetry.dependencies]
python = ">=3.11,<3.12"
envmgr-alpha = "^1.0"
envmgr-torchish = {{ version = "2.5.1+cu124", source = "pytorch" }}
envmgr-gitdep = {{ git = "{GIT}", branch = "main" }}

[[tool.poetry.source]]
name = "pytorch"
url = "{DECLARED}"
priority = "explicit"
"""


def _wheel_entry(path: Path) -> dict:
    return {"file": path.name, "hash": "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()}


def _package(name: str, version: str, files: list[Path], dependencies: dict | None = None,
             source: dict | None = None) -> dict:
    package = {"name": name, "version": version, "description": "", "optional": False, "python-versions": "*",
               "groups": ["main"], "files": [_wheel_entry(f) for f in files]}
    if dependencies:
        package["dependencies"] = dependencies
    if source:
        package["source"] = source
    return package


@pytest.fixture(scope="module")
def indexes(tmp_path_factory):
    """The default index (newer releases than the repository locked) and its +cu124 index."""
    default, cuda = tmp_path_factory.mktemp("default-index"), tmp_path_factory.mktemp("cu124-index")
    wheels = {
        "alpha": build_wheel(default, "envmgr-alpha", "1.0", requires=["envmgr-beta>=1.0"],
                             body='from envmgr_beta import NAME\nGREETING = "alpha+" + NAME\n'),
        "beta": build_wheel(default, "envmgr-beta", "1.0", body='NAME = "beta-1.0"\n'),
        "torch-cu": build_wheel(cuda, "envmgr-torchish", "2.5.1+cu124", body='BUILD = "2.5.1+cu124"\n'),
        "gitdep": build_wheel(default, "envmgr-gitdep", "0.4.0", body='VERSION = "0.4.0"\n'),
    }
    build_wheel(default, "envmgr-beta", "1.1", body='NAME = "beta-1.1"\n')          # a fresh solve takes it
    build_wheel(default, "envmgr-torchish", "2.5.1", body='BUILD = "2.5.1"\n')
    build_wheel(default, "envmgr-torchish", "2.6.0", body='BUILD = "2.6.0"\n')
    build_wheel(default, "envmgr-gitdep", "0.5.0", body='VERSION = "0.5.0"\n')
    build_wheel(cuda, "envmgr-torchish", "2.6.0+cu124", body='BUILD = "2.6.0+cu124"\n')
    lock = {
        "package": [
            _package("envmgr-alpha", "1.0", [wheels["alpha"]], {"envmgr-beta": ">=1.0"}),
            _package("envmgr-beta", "1.0", [wheels["beta"]]),
            _package("envmgr-gitdep", "0.4.0", [], source={"type": "git", "url": GIT, "reference": "main",
                                                          "resolved_reference": "0" * 40}),
            _package("envmgr-torchish", "2.5.1+cu124", [wheels["torch-cu"]],
                     source={"type": "legacy", "url": DECLARED, "reference": "pytorch"}),
        ],
        "metadata": {"lock-version": "2.1", "python-versions": ">=3.11,<3.12", "content-hash": "0" * 64},
    }
    served = Index(default).start(), Index(cuda).start()
    yield served[0], served[1], tomli_w.dumps(lock)
    for index in served:
        index.stop()


def _add(workspace, tmp_path: Path, name: str, lock_text: str) -> Path:
    archive = tmp_path / f"{name}.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path, text in {"pyproject.toml": PYPROJECT, "poetry.lock": lock_text,
                           "train.py": "import envmgr_alpha\nprint(envmgr_alpha.GREETING)\n"}.items():
            zf.writestr(f"{name}-main/{path}", text)
    workspace.envmgr("method", "add", str(archive), "--name", name)
    return workspace.base_dir / "methods" / name


def _adapt(method: Path, **adapt) -> None:
    data = tomllib.loads((method / "envmgr.toml").read_text())
    data["adapt"] = adapt
    (method / "envmgr.toml").write_text(tomli_w.dumps(data))


def _versions(method: Path) -> dict[str, str]:
    lock = tomllib.loads((method / "lock" / "poetry.lock").read_text())
    return {p["name"]: p["version"] for p in lock["package"]}


def _done(proc) -> dict:
    return [json.loads(line) for line in proc.stdout.splitlines() if '"event": "done"' in line][-1]


def test_adapted_lock_keeps_every_version_of_the_repository_lock(workspace, indexes, tmp_path):
    default, cuda, lock_text = indexes
    method = _add(workspace, tmp_path, "ownlock", lock_text)
    theirs = {p["name"]: p["version"] for p in tomllib.loads(lock_text)["package"]}

    refused = workspace.envmgr("lock", "ownlock", mirror=default.url, check=False)
    assert refused.returncode == 2
    assert 'pin = { envmgr-gitdep = "0.4.0" }' in refused.stderr, refused.stderr   # the authors' version

    # the +cu124 index mapped to the default index: the public release of the locked build, nothing else moves
    _adapt(method, pin={"envmgr-gitdep": "0.4.0"}, sources={"pytorch": "default"})
    locked = _done(workspace.envmgr("--json", "lock", "ownlock", mirror=default.url))
    ours = _versions(method)
    assert ours == {**theirs, "envmgr-torchish": "2.5.1"}, "a fresh solve would take beta 1.1 and torchish 2.6.0"
    assert locked["drift"] == [{"package": "envmgr-torchish", "theirs": "2.5.1+cu124", "ours": "2.5.1"}]
    assert GIT not in (method / "lock" / "poetry.lock").read_text()
    shown = workspace.envmgr("lock", "ownlock", mirror=default.url).stdout
    assert "envmgr-torchish: 2.5.1+cu124 → 2.5.1" in shown

    # the same index mapped to a site mirror: the authors' +cu124 build kept, the lock names the declared index
    config = tmp_path / "site.toml"
    config.write_text(f'[mirrors.sources]\npytorch = "{cuda.url}"\n')
    _adapt(method, pin={"envmgr-gitdep": "0.4.0"}, sources={"pytorch": "mirror"})
    locked = _done(workspace.envmgr("--json", "lock", "ownlock", "--regenerate", mirror=default.url,
                                    ENVMGR_CONFIG=str(config)))
    assert _versions(method) == theirs and locked["drift"] == []
    text = (method / "lock" / "poetry.lock").read_text()
    assert f'url = "{DECLARED}"' in text and "127.0.0.1" not in text
    assert workspace.envmgr("lock", "ownlock", "--check", ENVMGR_CONFIG=str(config)).returncode == 0


def test_a_failed_solve_shows_poetrys_reason(workspace, indexes, tmp_path):
    default, _, lock_text = indexes
    method = _add(workspace, tmp_path, "ownlockbad", lock_text)
    # a user's pin of a +cu124 build on an index mapped to the default index means its public release
    _adapt(method, pin={"envmgr-gitdep": "0.4.0", "envmgr-torchish": "2.5.1+cu124", "envmgr-alpha": "7.0"},
           sources={"pytorch": "default"})
    failed = workspace.envmgr("lock", "ownlockbad", mirror=default.url, check=False)
    assert failed.returncode == 1, failed.stderr
    assert "poetry found no solution: Because" in failed.stderr and "version solving failed" in failed.stderr
    assert "envmgr-alpha (==7.0)" in failed.stderr and "Deprecat" not in failed.stderr
    assert not (method / "lock" / "poetry.lock").exists()
