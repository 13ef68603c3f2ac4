"""Third-party repositories as methods: add from a zip, unreachable sources named up front, fixed
through [adapt], locked through a loopback mirror, built reproducibly, run with no network."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tomllib
import zipfile
from pathlib import Path

import pytest
import tomli_w

from tests.support.said import run_dir_of

pytestmark = pytest.mark.engine

POETRY_REPO = {
    "pyproject.toml": """\
[tool.poetry]
name = "third-trainer"
version = "0.3.0"
description = "someone else's training code"
authors = ["Someone <someone@example.invalid>"]

[tool.poetry.dependencies]
python = ">=3.11,<3.12"
envmgr-alpha = "^1.0"
envmgr-beta = { git = "https://git.example.invalid/beta.git", branch = "main" }
envmgr-gamma = { version = "^2.0", source = "pytorch" }

[[tool.poetry.source]]
name = "pytorch"
url = "https://download.example.invalid/whl/cu121"
priority = "explicit"

[build-system]
requires = ["poetry-core"]
build-backend = "poetry.core.masonry.api"
""",
    "train.sh": """\
#!/usr/bin/env bash
# like SimpleTuner's: re-installs at every launch unless told not to
set -e
if [ -z "${DISABLE_UPDATES:-}" ]; then pip install -U envmgr-alpha; fi
exec python train.py "$@"
""",
    "train.py": """\
import os, pathlib
import envmgr_alpha, envmgr_gamma
model = pathlib.Path(os.environ["ENVMGR_MODEL_PATH"])
try:
    (model / "written-by-method").write_text("x")
    writable = True
except OSError:
    writable = False
out = pathlib.Path(os.environ["ENVMGR_OUTPUT_DIR"])
out.mkdir(parents=True, exist_ok=True)
(out / "result.txt").write_text(f"{envmgr_alpha.GREETING} {sorted(os.listdir(model))} model_writable={writable}")
(out / "adapter.safetensors").write_bytes(b"weights")
print('{"event": "done", "steps": 0}')
""",
}

PIP_REPO = {
    "requirements.txt": "--extra-index-url https://download.example.invalid/whl\nenvmgr-alpha>=1.0\n",
    "train.py": "import envmgr_alpha, os, pathlib\nprint(envmgr_alpha.GREETING)\n"
                "pathlib.Path(os.environ['ENVMGR_OUTPUT_DIR'], 'greeting.txt').write_text(envmgr_alpha.GREETING)\n"
                "pathlib.Path(os.environ['ENVMGR_OUTPUT_DIR'], 'model.pt').write_bytes(b'weights')\n",
}

# Shaped like a real launcher: writes a log beside itself, reads its config relative to itself or from
# an input, draws a tqdm-style bar with carriage returns, and exits 0 even when it produced nothing or
# crashed (like SimpleTuner's train.sh: a cache file in output/, then a traceback on a read-only dataset).
LAUNCHER_REPO = {
    "requirements.txt": "envmgr-alpha>=1.0\n",
    "config/defaults.json": '{"steps": 3}\n',
    "train.sh": """\
#!/usr/bin/env bash
HERE="$(cd "$(dirname "$0")" && pwd)"
echo "launch $(id -u) mode=${MODE:-unset}" >> "$HERE/debug.log"
CONFIG="${CONFIG_FILE:-$HERE/config/defaults.json}"
python - "$CONFIG" <<'PY'
import json, os, sys, pathlib, envmgr_alpha
if os.environ.get("MODE") == "crash":   # one stream: the engine may interleave stdout and stderr out of order
    sys.stdout = sys.stderr
config = json.loads(pathlib.Path(sys.argv[1]).read_text())
for step in range(1, config["steps"] + 1):
    sys.stdout.write(f"\\r{step * 100 // config['steps']:3d}%|{'#' * step}| {step}/{config['steps']}")
    sys.stdout.flush()
print()
out = pathlib.Path(os.environ["ENVMGR_OUTPUT_DIR"])
if os.environ.get("MODE") in ("crash", "cache-only"):
    (out / "cache").mkdir(exist_ok=True)
    (out / "cache" / "text_embeds.pt").write_bytes(b"cached")
    print("Traceback (most recent call last): a line that looks like one is not a crash")
if os.environ.get("MODE") == "crash":
    dataset = os.environ["ENVMGR_DATASET_PATH"]
    open(os.path.join(dataset, "aspect_ratio_bucket_indices.json"), "w").write("{}")
if os.environ.get("MODE") == "cache-only":
    print("training finished")
elif os.environ.get("MODE") != "crash":
    (out / "model.safetensors").write_text(f"{envmgr_alpha.GREETING} steps={config['steps']}")
PY
exit 0
""",
}


def _zip(path: Path, files: dict[str, str]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in files.items():
            info = zipfile.ZipInfo(f"third-main/{name}")
            info.external_attr = (0o755 if name.endswith(".sh") else 0o644) << 16
            zf.writestr(info, text)
        zf.writestr("__MACOSX/third-main/._train.py", "junk")
    return path


def _tree_digest(root: Path) -> str:
    sha = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        sha.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return sha.hexdigest()


def _adapt(spec_path: Path, **adapt) -> None:
    data = tomllib.loads(spec_path.read_text())
    data["adapt"].update(adapt)
    spec_path.write_text(tomli_w.dumps(data))


def _done(proc) -> dict:
    return [json.loads(line) for line in proc.stdout.splitlines() if '"event": "done"' in line][-1]


def test_poetry_repository_added_adapted_locked_built_and_run(workspace, engine, mirror_a, tmp_path):
    archive = _zip(tmp_path / "third.zip", POETRY_REPO)
    workspace.envmgr("method", "add", str(archive), "--name", "third")
    method = workspace.base_dir / "methods" / "third"
    source_digest = _tree_digest(method / "source")
    assert (method / "source" / "train.sh").read_text() == POETRY_REPO["train.sh"]
    assert "third" in workspace.envmgr("list").stdout

    refused = workspace.envmgr("lock", "third", mirror=mirror_a.url, check=False)
    assert refused.returncode == 2
    assert "envmgr-beta comes from git" in refused.stderr and "index 'pytorch'" in refused.stderr
    assert not (method / "lock" / "poetry.lock").exists(), "no half lock"

    _adapt(method / "envmgr.toml", pin={"envmgr-beta": "1.0"}, sources={"pytorch": "default"})
    workspace.envmgr("lock", "third", mirror=mirror_a.url)
    lock = (method / "lock" / "poetry.lock").read_text()
    assert "127.0.0.1" not in lock and "git" not in lock
    assert {p["name"]: p["version"] for p in tomllib.loads(lock)["package"]}["envmgr-beta"] == "1.0"
    assert _tree_digest(method / "source") == source_digest, "the third-party files changed"
    shown = workspace.envmgr("show", "third").stdout
    assert "pin envmgr-beta == 1.0" in shown and "index 'pytorch' -> the default index" in shown

    first = _done(workspace.envmgr("--json", "build", "third", mirror=mirror_a.url))
    engine.images.remove(first["image"], force=True)
    shutil.rmtree(workspace.cache_dir)
    second = _done(workspace.envmgr("--json", "build", "third", mirror=mirror_a.url))
    assert second["image"] == first["image"] and not second["reused"]

    model = workspace.base_dir / "models" / "some-model"
    model.mkdir(parents=True)
    (model / "weights.bin").write_text("w")
    ran = workspace.envmgr("--json", "run", "third", "--model", "some-model", "--gpus", "none")
    run_dir = Path(_done(ran)["run_dir"])
    assert json.loads((run_dir / "run.json").read_text())["status"] == "succeeded"
    result = (run_dir / "output" / "result.txt").read_text()
    assert result == "alpha+beta-1.0 ['weights.bin'] model_writable=False"
    assert sorted(p.name for p in model.iterdir()) == ["weights.bin"]


def test_requirements_repository_locked_with_hashes_and_run(workspace, engine, mirror_a, tmp_path):
    workspace.envmgr("method", "add", str(_zip(tmp_path / "pip.zip", PIP_REPO)), "--name", "pipper")
    method = workspace.base_dir / "methods" / "pipper"
    refused = workspace.envmgr("lock", "pipper", mirror=mirror_a.url, check=False)
    assert refused.returncode == 2 and "download.example.invalid" in refused.stderr
    _adapt(method / "envmgr.toml", sources={"download.example.invalid": "default"})
    workspace.envmgr("lock", "pipper", mirror=mirror_a.url)
    lock = (method / "lock" / "requirements.lock.txt").read_text()
    assert "envmgr-alpha==1.0" in lock and "envmgr-beta==1.1" in lock and "--hash=sha256:" in lock
    assert "127.0.0.1" not in lock and "index-url" not in lock
    assert workspace.envmgr("lock", "pipper", "--check").returncode == 0
    _done(workspace.envmgr("--json", "build", "pipper", mirror=mirror_a.url))
    ran = workspace.envmgr("-v", "run", "pipper", "--gpus", "none")
    assert "alpha+beta-1.1" in ran.stderr + ran.stdout


def test_sdist_only_pin_is_refused_by_name_without_building(workspace, tmp_path):
    """An sdist that needs torch at build time (like many CUDA extensions) fails the lock with its name,
    and nothing of it runs: envmgr locks and installs wheels only unless [adapt] build_from_source names it."""
    import io
    import tarfile

    from tests.support.pypi import Index, build_wheel

    root = tmp_path / "index"
    build_wheel(root, "envmgr-alpha", "1.0")
    setup = b"import torch  # needs torch at build time, like flash-attn\n"
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:gz") as tf:
        for name, body in (("needs-torch-0.1/setup.py", setup),
                           ("needs-torch-0.1/PKG-INFO", b"Metadata-Version: 2.1\nName: needs-torch\nVersion: 0.1\n")):
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tf.addfile(info, io.BytesIO(body))
    (root / "needs_torch-0.1.tar.gz").write_bytes(data.getvalue())
    index = Index(root, sdists=True).start()
    try:
        repo = {"requirements.txt": "needs-torch==0.1\n", "train.py": "print(1)\n"}
        workspace.envmgr("method", "add", str(_zip(tmp_path / "heavy.zip", repo)), "--name", "heavy")
        proc = workspace.envmgr("lock", "heavy", mirror=index.url, check=False)
    finally:
        index.stop()
    assert proc.returncode == 1, proc.stderr
    assert "needs-torch==0.1 has only a source distribution" in proc.stderr, proc.stderr
    assert 'build_from_source = ["needs-torch"]' in proc.stderr
    assert "Traceback" not in proc.stderr and "import torch" not in proc.stderr


def test_launcher_gets_inputs_env_a_writable_folder_and_an_honest_verdict(workspace, mirror_a, tmp_path):
    workspace.envmgr("method", "add", str(_zip(tmp_path / "launcher.zip", LAUNCHER_REPO)), "--name", "launcher")
    method = workspace.base_dir / "methods" / "launcher"
    spec = tomllib.loads((method / "envmgr.toml").read_text())
    assert "success" not in spec and spec["verdict"] == "training" and spec["workdir"] == "method"
    source_digest = _tree_digest(method / "source")
    workspace.envmgr("lock", "launcher", mirror=mirror_a.url)
    built = _done(workspace.envmgr("--json", "build", "launcher", mirror=mirror_a.url))

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "config.json").write_text('{"steps": 5}\n')
    inputs.chmod(0o755)
    ran = workspace.envmgr("--json", "run", "launcher", "--gpus", "none", "--input", f"{inputs}:cfg",
                           "--env", "CONFIG_FILE=/envmgr/inputs/cfg/config.json", "--env", "MODE=good")
    run_dir = Path(_done(ran)["run_dir"])
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "succeeded" and record["reason"] is None
    assert record["verdict"]["rule"] == "training files" and "output/model.safetensors" in record["verdict"]["detail"]
    assert (run_dir / "output" / "model.safetensors").read_text() == "alpha+beta-1.1 steps=5"
    assert record["env"] == {"CONFIG_FILE": "/envmgr/inputs/cfg/config.json", "MODE": "good"}
    [given] = record["inputs"]
    assert given["name"] == "cfg" and given["path"] == str(inputs) and given["hash"].startswith("sha256:")
    log = run_dir / "work" / "method" / "debug.log"          # written beside train.sh, by a non-root uid
    uid = record["run_as"].split(":")[0]
    assert log.read_text() == f"launch {uid} mode=good\n" and uid != "0"
    assert str(log.stat().st_uid) == uid
    assert "100%|#####| 5/5" in (run_dir / "log.txt").read_text()
    assert _tree_digest(method / "source") == source_digest, "the method's own files changed"
    assert record["image"]["id"] == built["image"], "run-time inputs and env are not part of the image"

    dataset = workspace.base_dir / "datasets" / "pets"       # under datasets/: --resume mounts it again
    dataset.mkdir(parents=True)
    (dataset / "cat.png").write_bytes(b"png")
    dataset.chmod(0o755)
    crashed = workspace.envmgr("run", "launcher", "--gpus", "none", "--env", "MODE=crash", "--dataset", "pets",
                               check=False)
    assert crashed.returncode == 1 and "failed (uncaught traceback)" in crashed.stderr, crashed.stderr
    assert "(rule: traceback)" in crashed.stderr and 'dataset_mode = "writable"' in crashed.stderr, crashed.stderr
    crash_dir = run_dir_of(crashed, workspace.base_dir / "runs" / "launcher")
    record = json.loads((crash_dir / "run.json").read_text())
    assert (record["status"], record["reason"], record["exit_code"]) == ("failed", "uncaught traceback", 0)
    assert record["verdict"]["rule"] == "traceback" and "/envmgr/data/pets" in record["verdict"]["detail"]
    assert (crash_dir / "output" / "cache" / "text_embeds.pt").is_file() and record["inputs"] == []
    shown = workspace.envmgr("runs", "show", crash_dir.name).stdout
    assert "verdict: failed — exit 0 but the log ends in an uncaught traceback" in shown
    assert "(rule: traceback)" in shown and 'dataset_mode = "writable"' in shown

    resumed = workspace.envmgr("run", "launcher", "--resume", crash_dir.name, "--gpus", "none", check=False)
    assert resumed.returncode == 1 and "failed (uncaught traceback)" in resumed.stderr
    assert (crash_dir / "work" / "method" / "debug.log").read_text().count("mode=crash") == 2, \
        "resume keeps the method's folder and its recorded env"

    cached = workspace.envmgr("run", "launcher", "--gpus", "none", "--env", "MODE=cache-only", check=False)
    assert cached.returncode == 1 and "failed (no training outputs)" in cached.stderr, cached.stderr
    cache_dir = run_dir_of(cached, workspace.base_dir / "runs" / "launcher")
    record = json.loads((cache_dir / "run.json").read_text())
    assert (record["status"], record["exit_code"], record["verdict"]["rule"]) == ("failed", 0, "training files")

    refused = workspace.envmgr("run", "launcher", "--gpus", "none", "--env", "HOME=/root", check=False)
    assert refused.returncode == 2 and "envmgr sets it itself" in refused.stderr
    secret = tmp_path / "secret.json"
    secret.write_text("{}")
    secret.chmod(0o600)
    if record["run_as"] != f"{os.getuid()}:{os.getgid()}":
        unreadable = workspace.envmgr("run", "launcher", "--gpus", "none", "--input", str(secret), check=False)
        assert unreadable.returncode == 2 and "not readable by the user the method runs as" in unreadable.stderr
    gone = workspace.envmgr("run", "launcher", "--gpus", "none", "--input", str(tmp_path / "nope"), check=False)
    assert gone.returncode == 2 and "does not exist" in gone.stderr


def test_a_bar_redrawn_with_carriage_returns_reaches_the_display_before_its_newline(store, engine):
    """The engine's log stream holds a line back until its newline; the attached stream does not."""
    import time

    from envmgr.core.config import load_config
    from envmgr.core.ui import Reporter
    from envmgr.door.containers import ContainerSpec
    from envmgr.door.context import Context
    from envmgr.door.engine import Engine
    from envmgr.images.base import ensure_base

    ctx = Context(config=load_config({"cache_dir": str(store / "cache")}, files=[]), ui=Reporter("plain"))
    image = ensure_base(ctx, "bookworm-py311").image_id
    script = ("import sys, time\nfor i in range(3):\n    sys.stdout.write(f'\\r{i + 1}/3'); sys.stdout.flush(); "
              "time.sleep(1)\nprint()\nprint('after')\n")
    partial: list[tuple[str, float]] = []
    lines: list[str] = []
    spec = ContainerSpec(image=image, command=["/usr/bin/python3.11", "-c", script], user="65534:65534").hardened()
    ended = Engine().run(spec, on_line=lines.append, on_partial=lambda s: partial.append((s, time.monotonic())))
    done = time.monotonic()
    assert ended.exit_code == 0
    assert [text for text, _ in partial] == ["1/3", "2/3", "3/3"]
    assert partial[0][1] < done - 1.5, "the first segment came while the container still ran"
    assert lines == ["\r1/3\r2/3\r3/3", "after"]


NEWER_PYTHON_REPO = {
    "pyproject.toml": '[project]\nname = "newer"\nversion = "1.0"\nrequires-python = ">=3.12"\n',
    "requirements.txt": "envmgr-alpha>=1.0\n",
    "train.py": "import os, pathlib, sys, envmgr_alpha\n"
                "print('python', '.'.join(map(str, sys.version_info[:2])), envmgr_alpha.GREETING)\n"
                "pathlib.Path(os.environ['ENVMGR_OUTPUT_DIR'], 'lora.safetensors').write_bytes(b'weights')\n",
}


def test_a_repository_that_needs_a_newer_python_gets_the_base_image_that_has_it(workspace, engine, mirror_a,
                                                                                tmp_path):
    """requires-python >= 3.12 excludes the default base (Python 3.11): `method add` picks trixie-py313,
    and the method locks, builds and runs on Python 3.13. A Python no base has is refused by name."""
    workspace.envmgr("method", "add", str(_zip(tmp_path / "newer.zip", NEWER_PYTHON_REPO)), "--name", "newer")
    spec = tomllib.loads((workspace.base_dir / "methods" / "newer" / "envmgr.toml").read_text())
    assert (spec["python"], spec["base_image"]) == ("3.13", "trixie-py313")
    workspace.envmgr("lock", "newer", mirror=mirror_a.url)
    built = _done(workspace.envmgr("--json", "build", "newer", mirror=mirror_a.url))
    assert engine.images.get(built["image"]).labels.get("org.envmgr.method") == "newer"
    ran = workspace.envmgr("-v", "run", "newer", "--gpus", "none")
    assert "python 3.13 alpha+beta-1.1" in ran.stderr + ran.stdout

    future = {**NEWER_PYTHON_REPO, "pyproject.toml": NEWER_PYTHON_REPO["pyproject.toml"].replace(">=3.12", ">=3.99")}
    refused = workspace.envmgr("method", "add", str(_zip(tmp_path / "future.zip", future)), "--name", "future",
                               check=False)
    assert refused.returncode == 2 and "needs Python >=3.99, and no base image has one" in refused.stderr
    assert "bookworm-py311 (Python 3.11)" in refused.stderr and "trixie-py313 (Python 3.13)" in refused.stderr
    assert not (workspace.base_dir / "methods" / "future").exists()


# Shaped like SimpleTuner's train.sh: reads config/<ENV>/config.json relative to itself, nothing else.
CONFIG_READER_REPO = {
    "requirements.txt": "envmgr-alpha>=1.0\n",
    "config/examples/config.json": '{"steps": 1}\n',
    "train.sh": """\
#!/usr/bin/env bash
HERE="$(cd "$(dirname "$0")" && pwd)"
CONFIG="$HERE/config/$ENV/config.json"
[ -f "$CONFIG" ] || { echo "no $CONFIG"; exit 2; }
if [ "${CRASH_ONCE:-}" = 1 ] && [ ! -f "$ENVMGR_OUTPUT_DIR/attempted" ]; then
  touch "$ENVMGR_OUTPUT_DIR/attempted"; echo garbage > "$CONFIG"; echo "crashed"; exit 3
fi
python - "$CONFIG" <<'PY'
import json, os, pathlib, sys
steps = json.loads(pathlib.Path(sys.argv[1]).read_text())["steps"]
pathlib.Path(os.environ["ENVMGR_OUTPUT_DIR"], "model.safetensors").write_text(f"steps={steps}")
PY
""",
}


def test_a_file_placed_with_file_reaches_the_method_folder_and_is_placed_again_on_resume(
        workspace, mirror_a, tmp_path):
    workspace.envmgr("method", "add", str(_zip(tmp_path / "reader.zip", CONFIG_READER_REPO)), "--name", "reader")
    method = workspace.base_dir / "methods" / "reader"
    source_digest = _tree_digest(method / "source")
    workspace.envmgr("lock", "reader", mirror=mirror_a.url)
    workspace.envmgr("build", "reader", mirror=mirror_a.url)
    cfg = tmp_path / "cfg.json"
    cfg.write_text('{"steps": 4}\n')
    cfg.chmod(0o644)

    missing = workspace.envmgr("run", "reader", "--gpus", "none", "--env", "ENV=my", check=False)
    assert missing.returncode == 1 and "no /envmgr/run/method/config/my/config.json" in missing.stderr

    crashed = workspace.envmgr("run", "reader", "--gpus", "none", "--env", "ENV=my", "--env", "CRASH_ONCE=1",
                               "--file", f"{cfg}:config/my/config.json", check=False)
    assert crashed.returncode == 1 and "crashed" in crashed.stderr, crashed.stderr
    run_dir = run_dir_of(crashed, workspace.base_dir / "runs" / "reader")
    placed = run_dir / "work" / "method" / "config" / "my" / "config.json"
    assert placed.read_text() == "garbage\n", "the method saw (and overwrote) the placed file"
    [given] = json.loads((run_dir / "run.json").read_text())["files"]
    assert given["source"] == str(cfg) and given["path"] == "config/my/config.json"
    assert given["hash"].startswith("sha256:")

    workspace.envmgr("run", "reader", "--resume", run_dir.name, "--gpus", "none")
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "succeeded" and record["files"] == [given]
    assert placed.read_text() == '{"steps": 4}\n', "resume places the recorded file again"
    assert (run_dir / "output" / "model.safetensors").read_text() == "steps=4"
    assert _tree_digest(method / "source") == source_digest, "the method's own files changed"

    spec_path = method / "envmgr.toml"                 # no per-run copy: mounted over the image's folder
    spec_path.write_text(spec_path.read_text().replace('workdir = "method"', 'workdir = "run"'))
    mounted = workspace.envmgr("--json", "run", "reader", "--gpus", "none", "--env", "ENV=my",
                               "--file", f"{cfg}:config/my/config.json", mirror=mirror_a.url)
    assert (Path(_done(mounted)["run_dir"]) / "output" / "model.safetensors").read_text() == "steps=4"


DYNAMIC_BACKEND = '''
import os, socket, sys

PORT = {port}


def _reach_out():
    """What package code tries when it runs: the host's loopback, and the mirror credentials."""
    for path in (os.environ.get("NETRC", ""), "/opt/envmgr/netrc"):
        try:
            open(path).read()
            return "read credentials"
        except OSError:
            pass
    try:
        with socket.create_connection(("127.0.0.1", PORT), timeout=2) as sock:
            sock.sendall(b"reached the host from the metadata step")
        return "network"
    except OSError:
        return "boxed"


def get_requires_for_build_wheel(config_settings=None):
    return []


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    print("metadata step:", _reach_out(), flush=True)
    # computed when the backend runs, like a setup.py that reads the platform
    deps = ["envmgr-alpha>=1.0"] + (["envmgr-beta==1.0"] if sys.platform == "linux" else ["envmgr-beta==1.1"])
    folder = os.path.join(metadata_directory, "dyn_trainer-0.1.dist-info")
    os.makedirs(folder)
    with open(os.path.join(folder, "METADATA"), "w") as fh:
        fh.write("Metadata-Version: 2.1\\nName: dyn-trainer\\nVersion: 0.1\\n"
                 + "".join(f"Requires-Dist: {{d}}\\n" for d in deps)
                 + "Requires-Dist: envmgr-gamma>=2.0; extra == \\"windows\\"\\n")
    return "dyn_trainer-0.1.dist-info"


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    raise RuntimeError("envmgr needs only the metadata")
'''

DYNAMIC_REPO = {
    "pyproject.toml": '[build-system]\nrequires = []\nbuild-backend = "dynbackend"\nbackend-path = ["."]\n\n'
                      '[project]\nname = "dyn-trainer"\nversion = "0.1"\nrequires-python = ">=3.11"\n'
                      'dynamic = ["dependencies"]\n',
    "train.py": "import os, pathlib, envmgr_alpha\nprint(envmgr_alpha.GREETING)\n"
                "pathlib.Path(os.environ['ENVMGR_OUTPUT_DIR'], 'lora.safetensors').write_bytes(b'weights')\n",
}


def test_a_project_whose_dependencies_its_build_backend_computes_is_added_and_locked_in_the_box(
        workspace, engine, mirror_a, tmp_path):
    """No requirements.txt and `dynamic = ["dependencies"]` (as a setup.py project): `method add` takes it,
    `lock` runs the project's build backend with no network and no credentials, and locks what it named."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.settimeout(0.2)
    repo = {**DYNAMIC_REPO, "dynbackend.py": DYNAMIC_BACKEND.format(port=listener.getsockname()[1])}
    try:
        added = workspace.envmgr("--json", "method", "add", str(_zip(tmp_path / "dyn.zip", repo)), "--name", "dyn")
        assert "build backend" in added.stdout + added.stderr
        method = workspace.base_dir / "methods" / "dyn"
        locked = workspace.envmgr("-v", "lock", "dyn", mirror=mirror_a.url)
        assert "metadata step: boxed" in locked.stdout + locked.stderr
        with pytest.raises(OSError):
            listener.accept()   # nothing reached the host
        named = (method / "lock" / "requirements.project.txt").read_text()
        assert "envmgr-alpha>=1.0" in named and "envmgr-beta==1.0" in named and "gamma" not in named
        lock = (method / "lock" / "requirements.lock.txt").read_text()
        assert "envmgr-beta==1.0" in lock and "--hash=sha256:" in lock
        assert workspace.envmgr("lock", "dyn", "--check").returncode == 0
        ran = workspace.envmgr("-v", "run", "dyn", "--gpus", "none", mirror=mirror_a.url)
        assert "alpha+beta-1.0" in ran.stdout + ran.stderr

        # the project's files changed: the dependencies are read again before anything is built
        (method / "source" / "pyproject.toml").write_text(repo["pyproject.toml"] + "# changed\n")
        stale = workspace.envmgr("lock", "dyn", "--check", check=False)
        assert stale.returncode != 0 and "changed since its dependencies were read" in stale.stderr
    finally:
        listener.close()
