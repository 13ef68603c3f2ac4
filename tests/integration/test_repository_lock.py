"""A third-party poetry repository with a lock of its own (an extra +cu124 index, a git dependency): envmgr
adapts it on top of that lock, so every version the adaptation does not touch is the authors' version."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tomllib
import zipfile
from pathlib import Path

import pytest
import tomli_w

from tests.support.pypi import Index, build_wheel
from tests.support.said import run_dir_of

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
    shown = workspace.envmgr("lock", "ownlock", mirror=default.url).stderr   # talk is on stderr
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



@pytest.fixture(scope="module")
def pins_index(tmp_path_factory):
    """A default index with newer releases than a pip repository pinned (names of this test only: a shared uv
    cache must not mix them with other tests' wheels)."""
    root = tmp_path_factory.mktemp("pins-index")
    for version in ("1.0", "1.1"):
        build_wheel(root, "envmgr-pinseed-app", version, requires=["envmgr-pinseed-lib>=1.0"])
        build_wheel(root, "envmgr-pinseed-lib", version)
    for version in ("2.0", "2.1", "2.2"):
        build_wheel(root, "envmgr-pinseed-tool", version)
    served = Index(root).start()
    yield served
    served.stop()


def test_pip_repository_locks_on_top_of_its_own_pins(workspace, pins_index, tmp_path):
    archive = tmp_path / "pinseed.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path, text in {"requirements.txt": "envmgr-pinseed-app>=1.0\nenvmgr-pinseed-tool\n",
                           "requirements-lock.txt": "envmgr-pinseed-app==1.0\nenvmgr-pinseed-lib==1.0\n"
                                                    "envmgr-pinseed-tool==2.0\n",
                           "train.py": "import envmgr_pinseed_app\n"}.items():
            zf.writestr(f"pinseed-main/{path}", text)
    workspace.envmgr("method", "add", str(archive), "--name", "pinseed")
    method = workspace.base_dir / "methods" / "pinseed"
    theirs = {"envmgr-pinseed-app": "1.0", "envmgr-pinseed-lib": "1.0", "envmgr-pinseed-tool": "2.0"}

    def versions() -> dict[str, str]:
        return dict(re.findall(r"^(envmgr-pinseed-[a-z]+)==(\S+)", (method / "lock" / "requirements.lock.txt")
                               .read_text(), re.M))

    shown = workspace.envmgr("lock", "pinseed", mirror=pins_index.url)
    said = shown.stdout + shown.stderr
    # a fresh solve would take app 1.1, lib 1.1, tool 2.2
    assert versions() == theirs
    assert "started from the repository's pins in requirements-lock.txt" in said
    assert "0 changes against the repository's requirements-lock.txt (every version kept)" in said

    _adapt(method, pin={"envmgr-pinseed-tool": "2.1"})
    locked = _done(workspace.envmgr("--json", "lock", "pinseed", mirror=pins_index.url))
    assert versions() == {**theirs, "envmgr-pinseed-tool": "2.1"}
    assert locked["drift"] == [{"package": "envmgr-pinseed-tool", "theirs": "2.0", "ours": "2.1"}]
    assert locked["seeded_from"] == "requirements-lock.txt"
    assert "127.0.0.1" not in (method / "lock" / "requirements.lock.txt").read_text()
    assert workspace.envmgr("lock", "pinseed", "--check").returncode == 0

# Shaped like a real launcher: writes a log beside itself, reads its config relative to itself (or the one
# handed in at run time), writes an index beside its dataset's images, needs a system library, exits 0 always.
TRAIN_SH = """\
#!/usr/bin/env bash
HERE="$(cd "$(dirname "$0")" && pwd)"
echo "launch $(id -u) mode=${MODE:-unset}" >> "$HERE/debug.log"
CONFIG="${CONFIG_FILE:-$HERE/config/config.json}"
python - "$CONFIG" <<'PY'
import ctypes, json, os, sys, pathlib
import envmgr_alpha, envmgr_torchish, envmgr_gitdep
ctypes.CDLL("libyaml-0.so.2")   # from [system] apt, not in the base image
config = json.loads(pathlib.Path(sys.argv[1]).read_text())
data = pathlib.Path(os.environ["ENVMGR_DATASET_PATH"])
(data / "bucket-index.json").write_text(json.dumps(sorted(p.name for p in (data / "images").iterdir())))
if os.environ.get("MODE") == "crash":
    raise SystemExit("Traceback (most recent call last): the trainer crashed, the launcher does not care")
out = pathlib.Path(os.environ["ENVMGR_OUTPUT_DIR"])
(out / "lora.safetensors").write_text(
    f"{envmgr_alpha.GREETING} {envmgr_torchish.BUILD} {envmgr_gitdep.VERSION} steps={config['steps']}")
PY
echo "launcher done"
exit 0
"""


def test_repository_with_its_lock_runs_with_system_packages_inputs_and_a_writable_dataset(
        workspace, engine, indexes, tmp_path):
    default, _, lock_text = indexes
    archive = tmp_path / "ownrun.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path, text in {"pyproject.toml": PYPROJECT, "poetry.lock": lock_text, "train.sh": TRAIN_SH,
                           "config/config.json": '{"steps": 2}\n'}.items():
            zf.writestr(f"ownrun-main/{path}", text)
    workspace.envmgr("method", "add", str(archive), "--name", "ownrun")
    method = workspace.base_dir / "methods" / "ownrun"
    spec = tomllib.loads((method / "envmgr.toml").read_text())
    spec.update(adapt={"pin": {"envmgr-gitdep": "0.4.0"}, "sources": {"pytorch": "default"}},
                system={"apt": ["libyaml-0-2"]}, dataset_mode="writable", success=["output/*.safetensors"])
    (method / "envmgr.toml").write_text(tomli_w.dumps(spec))
    workspace.envmgr("lock", "ownrun", mirror=default.url)
    theirs = {p["name"]: p["version"] for p in tomllib.loads(lock_text)["package"]}
    assert _versions(method) == {**theirs, "envmgr-torchish": "2.5.1"}

    built = _done(workspace.envmgr("--json", "build", "ownrun", mirror=default.url))
    layers = engine.images.get(built["image"]).attrs["RootFS"]["Layers"]
    records = list(workspace.cache_dir.glob("layers/system-*.json"))
    # base, environment layers (skeleton + units), system packages above them (so torch layers stay
    # shared with methods that have none), method files
    assert len(records) == 1 and len(layers) >= 4
    assert layers[-2] == json.loads(records[0].read_text())["diff_id"], "system packages sit just below the method"
    assert [json.loads(r.read_text())["packages"] for r in records] == [{"libyaml-0-2": json.loads(
        records[0].read_text())["packages"]["libyaml-0-2"]}]
    system_tar = records[0].with_suffix(".tar").read_bytes()
    assert b"sources.list" not in system_tar and b"/var/lib/apt/lists" not in system_tar
    sbom = json.loads(workspace.envmgr("sbom", "ownrun").stdout)
    assert "libyaml-0-2" in {c["name"] for c in sbom["components"]}
    engine.images.remove(built["image"], force=True)
    shutil.rmtree(workspace.cache_dir)     # every layer made again, the system layer included: the same image
    again = _done(workspace.envmgr("--json", "build", "ownrun", mirror=default.url))
    assert again["image"] == built["image"] and not again["reused"]

    datasets = workspace.base_dir / "datasets"
    datasets.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(datasets / "pets.zip", "w") as zf:
        zf.writestr("pets/images/1.jpg", "jpg")
        zf.writestr("pets/images/1.txt", "a cat")
        zf.writestr("__MACOSX/pets/images/._1.jpg", "junk")
    zip_before = (datasets / "pets.zip").read_bytes()
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "config.json").write_text('{"steps": 5}\n')
    inputs.chmod(0o755)
    ran = workspace.envmgr("--json", "run", "ownrun", "--gpus", "none", "--dataset", "pets.zip",
                           "--input", f"{inputs}:cfg", "--env", "CONFIG_FILE=/envmgr/inputs/cfg/config.json",
                           "--env", "MODE=good")
    run_dir = Path(_done(ran)["run_dir"])
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "succeeded", (run_dir / "log.txt").read_text()
    # beta 1.0 is the repository's lock at work: a fresh solve would have installed 1.1
    assert (run_dir / "output" / "lora.safetensors").read_text() == "alpha+beta-1.0 2.5.1 0.4.0 steps=5"
    assert record["dataset"]["mode"] == "writable" and record["dataset"]["mounted_at"] == "/envmgr/data/pets"
    copy = run_dir / record["dataset"]["copy"]
    assert json.loads((copy / "bucket-index.json").read_text()) == ["1.jpg", "1.txt"]
    assert sorted(p.name for p in datasets.iterdir()) == ["pets.zip"]
    assert (datasets / "pets.zip").read_bytes() == zip_before
    uid = record["run_as"].split(":")[0]
    assert uid != "0" and str(copy.stat().st_uid) == uid
    assert (run_dir / "work" / "method" / "debug.log").read_text() == f"launch {uid} mode=good\n"

    crashed = workspace.envmgr("run", "ownrun", "--gpus", "none", "--dataset", "pets.zip", "--env", "MODE=crash",
                               check=False)
    assert crashed.returncode == 1 and "failed (no outputs)" in crashed.stderr, crashed.stderr
    crash_dir = run_dir_of(crashed, workspace.base_dir / "runs" / "ownrun")
    crash = json.loads((crash_dir / "run.json").read_text())
    assert (crash["status"], crash["reason"], crash["exit_code"]) == ("failed", "no outputs", 0)
    assert crash["missing_outputs"] == ["output/*.safetensors"]
