"""Lock, build and reproducibility against a real engine and real indexes on 127.0.0.1."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import tomllib

import pytest

from tests.support.engine import default_sigint
from tests.support.pypi import Index, build_wheel

pytestmark = pytest.mark.engine

SECRET = "s3cret-Mirror-Pass"


def _image_id(engine, ref):
    try:
        return engine.images.get(ref).id
    except Exception:  # noqa: BLE001
        return None


def _build_json(proc) -> dict:
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return [e for e in events if e.get("event") == "done"][-1]


def test_lock_through_mirror_records_no_mirror(workspace, mirror_a):
    workspace.envmgr("lock", "tiny", mirror=mirror_a.url)
    text = (workspace.method_dir / "poetry.lock").read_text()
    assert f"127.0.0.1:{mirror_a.port}" not in text and "http://" not in text
    lock = tomllib.loads(text)
    assert {p["name"]: p["version"] for p in lock["package"]} == {"envmgr-alpha": "1.0", "envmgr-beta": "1.1",
                                                                   "envmgr-gamma": "2.0"}
    assert all(f["hash"].startswith("sha256:") for p in lock["package"] for f in p["files"])
    assert any(path.startswith("/simple/envmgr-alpha") for path in mirror_a.requests), "the mirror was not used"
    assert workspace.envmgr("lock", "tiny", "--check").returncode == 0
    # pyproject.toml was not touched: no [[tool.poetry.source]] was added to reach the mirror
    assert "source" not in (workspace.method_dir / "pyproject.toml").read_text()


def test_stale_lock_is_refused_with_exit_3(workspace, mirror_a):
    missing = workspace.envmgr("build", "tiny", check=False)
    assert missing.returncode == 3 and "envmgr lock tiny" in missing.stderr
    workspace.envmgr("lock", "tiny", mirror=mirror_a.url)
    pyproject = workspace.method_dir / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"envmgr-alpha>=1.0"', '"envmgr-alpha>=1.0", "envmgr-beta"'))
    stale = workspace.envmgr("lock", "tiny", "--check", check=False)
    assert stale.returncode == 3
    assert "does not match pyproject.toml" in stale.stderr


def test_lock_via_a_build_via_b_same_image_from_clean_caches(workspace, engine, mirror_a, mirror_b):
    workspace.envmgr("lock", "tiny", mirror=mirror_a.url)
    before = len(mirror_b.requests)
    first = _build_json(workspace.envmgr("--json", "build", "tiny", mirror=mirror_b.url))
    assert not first["reused"]
    assert len(mirror_b.requests) > before, "the build did not fetch through mirror B"
    run = engine.containers.run(first["tag"], remove=True, network_mode="none")
    assert run.decode().split()[:2] == ["alpha+beta-1.1", "hello"]

    # Same inputs, image present: answered from the content hash.
    again = _build_json(workspace.envmgr("--json", "build", "tiny", mirror=mirror_b.url))
    assert again["reused"] and again["image"] == first["image"]

    # Remove the image, empty the caches, build again: the same image ID.
    engine.images.remove(first["image"], force=True)
    shutil.rmtree(workspace.cache_dir)
    rebuilt = _build_json(workspace.envmgr("--json", "build", "tiny", mirror=mirror_a.url))
    assert not rebuilt["reused"]
    assert rebuilt["image"] == first["image"]


def test_two_archives_from_fresh_caches_are_byte_identical(workspace, mirror_a, tmp_path):
    workspace.envmgr("lock", "tiny", mirror=mirror_a.url)
    digests = []
    for attempt in range(2):
        cache = tmp_path / f"cache-{attempt}"
        code = ("import sys; from envmgr.core.config import load_config; from envmgr.door.context import Context;"
                "from envmgr.core.ui import Reporter; from envmgr.core.spec import find_method; from envmgr.build.build import "
                "export_archive; from pathlib import Path;"
                "ctx = Context(load_config(), Reporter('plain'));"
                "spec = find_method('tiny', ctx.config.base_dir);"
                f"export_archive(ctx, spec, open({str(tmp_path / f'image-{attempt}.tar')!r}, 'wb'))")
        env = workspace.env(ENVMGR_CACHE_DIR=str(cache), ENVMGR_MIRRORS_PYPI=mirror_a.url)
        subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True)
        digests.append(hashlib.sha256((tmp_path / f"image-{attempt}.tar").read_bytes()).hexdigest())
        shutil.rmtree(cache)
    assert digests[0] == digests[1]


def test_credentials_never_reach_image_labels_history_lock_or_log(workspace, engine, mirror_b):
    lock = workspace.envmgr("-v", "lock", "tiny", mirror=mirror_b.url)
    built = workspace.envmgr("-v", "--json", "build", "tiny", mirror=mirror_b.url)
    doctor = workspace.envmgr("doctor", mirror=mirror_b.url, check=False)
    for output in (lock.stdout, lock.stderr, built.stdout, built.stderr, doctor.stdout, doctor.stderr):
        assert SECRET not in output
    assert "builder:***@" in doctor.stdout
    assert SECRET not in (workspace.method_dir / "poetry.lock").read_text()
    image = engine.images.get(_build_json(built)["tag"])
    assert SECRET not in json.dumps(image.attrs) and SECRET not in json.dumps(image.history())
    archive = b"".join(image.save())
    assert SECRET.encode() not in archive
    assert f"127.0.0.1:{mirror_b.port}".encode() not in archive


def test_wrong_hash_in_mirror_fails_build_and_tags_nothing(workspace, engine, mirror_a, tmp_path):
    workspace.envmgr("lock", "tiny", mirror=mirror_a.url)
    evil = tmp_path / "evil"
    evil.mkdir()
    for wheel in mirror_a.root.glob("*.whl"):
        shutil.copy(wheel, evil / wheel.name)
    build_wheel(evil, "envmgr-beta", "1.1", body='NAME = "tampered"\n')
    index = Index(evil).start()
    try:
        proc = workspace.envmgr("build", "tiny", mirror=index.url, check=False)
    finally:
        index.stop()
    assert proc.returncode == 5, proc.stderr
    assert "hash" in proc.stderr.lower()
    assert not [i for i in engine.images.list("envmgr/tiny")]
    assert not engine.containers.list(all=True, filters={"label": "org.envmgr.method=tiny"})


def test_unreachable_mirror_is_named_with_credentials_masked(workspace):
    proc = workspace.envmgr("lock", "tiny", mirror=f"http://builder:{SECRET}@127.0.0.1:9/simple/", check=False)
    assert proc.returncode in (1, 5)
    assert SECRET not in proc.stderr + proc.stdout
    assert "error:" in proc.stderr


def test_engine_not_running_says_how_to_start_it(workspace):
    proc = workspace.envmgr("build", "tiny", check=False, ENVMGR_ENGINE_URL="unix:///nonexistent/docker.sock")
    assert proc.returncode in (3, 4)
    proc = workspace.envmgr("doctor", check=False, ENVMGR_ENGINE_URL="unix:///nonexistent/docker.sock")
    assert proc.returncode == 4 and "dockerd" in proc.stdout


def test_two_builds_at_once_give_one_image_and_both_succeed(workspace, engine, mirror_a):
    workspace.envmgr("lock", "tiny", mirror=mirror_a.url)
    env = workspace.env(ENVMGR_MIRRORS_PYPI=mirror_a.url)
    procs = [subprocess.Popen([sys.executable, "-m", "envmgr", "--json", "build", "tiny"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    images = {_build_json(type("P", (), {"stdout": out})())["image"] for out, _ in results}
    assert len(images) == 1


def test_ctrl_c_during_build_leaves_no_container_and_no_tag(workspace, engine, mirror_a):
    workspace.envmgr("lock", "tiny", mirror=mirror_a.url)
    proc = subprocess.Popen([sys.executable, "-m", "envmgr", "build", "tiny"],
                            env=workspace.env(ENVMGR_MIRRORS_PYPI=mirror_a.url),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        # the low-level list: containers.list inspects each container and fails on one removed meanwhile
        if engine.api.containers(all=True, filters={"label": ["org.envmgr.kind=step", "org.envmgr.method=tiny"]}):
            break
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("the build never started its install container")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert not engine.containers.list(all=True, filters={"label": "org.envmgr.method=tiny"})
    assert not engine.images.list("envmgr/tiny")


def test_conda_run_shim_runs_the_method_in_its_environment(workspace, engine, mirror_a):
    workspace.envmgr("lock", "tiny", mirror=mirror_a.url)
    tag = _build_json(workspace.envmgr("--json", "build", "tiny", mirror=mirror_a.url))["tag"]
    out = engine.containers.run(tag, ["conda", "run", "-n", "tiny", "python", "main.py"], remove=True,
                                network_mode="none", working_dir="/opt/envmgr/method", user="1000:1000")
    assert out.decode().split() == ["alpha+beta-1.1", "hello", "/opt/envmgr/envs/tiny"]
    with pytest.raises(Exception) as missing:
        engine.containers.run(tag, ["conda", "run", "-n", "nope", "true"], remove=True, network_mode="none")
    assert "EnvironmentLocationNotFound" in str(missing.value.stderr)


def test_image_config_is_gpu_ready_and_labels_name_no_mirror(workspace, engine, mirror_a):
    workspace.envmgr("lock", "tiny", mirror=mirror_a.url)
    tag = _build_json(workspace.envmgr("--json", "build", "tiny", mirror=mirror_a.url))["tag"]
    attrs = engine.images.get(tag).attrs
    env = dict(item.split("=", 1) for item in attrs["Config"]["Env"])
    assert env["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility" and env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert attrs["Created"].startswith("2000-01-01")
    labels = attrs["Config"]["Labels"]
    assert labels["org.envmgr.method"] == "tiny" and len(labels["org.envmgr.lock-hash"]) == 64
    assert "127.0.0.1" not in json.dumps(labels)
    # bytecode is compiled without timestamps (unchecked-hash pycs), so it is the same on every build
    archive = io.BytesIO(b"".join(engine.images.get(tag).save()))
    with tarfile.open(fileobj=archive) as outer:
        layers = [tarfile.open(fileobj=outer.extractfile(m)) for m in outer.getmembers()
                  if m.name.endswith("layer.tar")]
        # the environment is one layer per distribution group: the one with envmgr-alpha's code
        env_layer = next(t for t in layers if any(n.endswith("envmgr_alpha/__init__.py") for n in t.getnames()))
        pycs = [m for m in env_layer.getmembers() if m.name.endswith(".pyc")]
        assert pycs and all(m.mtime == 946684800 and m.uid == 0 for m in env_layer.getmembers())
        flags = int.from_bytes(env_layer.extractfile(pycs[0]).read()[4:8], "little")
        assert flags == 0b01, "expected an unchecked-hash pyc"
