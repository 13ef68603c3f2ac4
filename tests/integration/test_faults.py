"""Faults with figures: a build killed with SIGKILL at several points, a full disk under the build
cache and under a run's checkpoints, two builds of one method at once, four runs at once. Each test
asserts that nothing is lost and nothing half-made is left or reused. (The engine stopping mid-run is
tests/integration/test_engine_restart.py: the real dockerd stop runs alone, after the rest.)
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.integration.conftest import REPO as SOURCE_ROOT, TINY_MAIN, TINY_PYPROJECT, TINY_SPEC
from tests.support.engine import drop_images_holding
from tests.support.said import error_lines

pytestmark = pytest.mark.engine

NAME = "tiny-faults"   # its own image name: other engineers' tests on this engine use `tiny`
TAG_REPO = f"envmgr/{NAME}"
# (a line the build prints, seconds after it): the 1 s one lands while the install container runs
KILL_POINTS = [(f"building {TAG_REPO}:", 0.0), ("installing ", 0.0), ("installing ", 1.0),
               ("writing environment layer", 0.0), ("loading the image into", 0.0)]


def _done(proc) -> dict:
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"event": "done"')][-1]


@pytest.fixture
def faults(workspace):
    folder = workspace.base_dir / "methods" / NAME
    folder.mkdir(parents=True)
    (folder / "envmgr.toml").write_text(TINY_SPEC.replace('name = "tiny"', f'name = "{NAME}"'))
    (folder / "pyproject.toml").write_text(TINY_PYPROJECT)
    (folder / "main.py").write_text(TINY_MAIN)
    return workspace


def _tags(engine) -> dict[str, str]:
    return {t: i.id for i in engine.images.list(TAG_REPO) for t in i.tags}


def _build_until(ws, mirror: str, point: str, delay: float) -> tuple[bool, list[str]]:
    """Start `envmgr build`, SIGKILL it right after it prints `point`. True if it was killed there."""
    env = ws.env(ENVMGR_MIRRORS_PYPI=mirror)
    proc = subprocess.Popen([sys.executable, "-m", "envmgr", "build", NAME], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=SOURCE_ROOT)
    seen: list[str] = []
    killed = False
    assert proc.stdout is not None
    for line in proc.stdout:
        seen.append(line.rstrip())
        if point in line:
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
    proc.wait(timeout=300)
    return killed and proc.returncode == -signal.SIGKILL, seen


def _cache_is_sound(cache: Path) -> None:
    """No file under a final name is partial: every cached layer hashes to its record, every stored layer
    to its name."""
    from envmgr.images.image import file_sha256

    layers = cache / "layers"
    for record in layers.glob("env-*.json") if layers.is_dir() else []:
        known = json.loads(record.read_text())
        tar = record.with_suffix(".tar")
        assert tar.is_file() and "sha256:" + file_sha256(tar)[0] == known["diff_id"], record.name
    stored = cache / "store" / "layers"
    for tar in stored.iterdir() if stored.is_dir() else []:
        if not tar.name.startswith("."):
            assert file_sha256(tar)[0] == tar.name, tar.name


def _leftover_containers(engine) -> int:
    found = engine.containers.list(all=True, filters={"label": f"org.envmgr.method={NAME}"})
    for container in found:
        container.remove(force=True)
    return len(found)


def test_sigkill_during_build_leaves_no_partial_tag_and_the_next_build_completes(faults, mirror_a, engine):
    faults.envmgr("lock", NAME, mirror=mirror_a.url)
    tried = survived = orphaned = 0
    tagged: dict[str, str] = {}
    for point, delay in KILL_POINTS:
        # each kill point from a cold environment layer: an attempt whose kill landed after the layer was
        # written (a fast machine, `installing` + 1 s) must not let the next one skip past its point
        for made in ("layers", "index"):
            shutil.rmtree(faults.cache_dir / "store" / made, ignore_errors=True)
        for image in engine.images.list(TAG_REPO):   # a kill that landed after the whole build: start cold again
            engine.images.remove(image.id, force=True)
        drop_images_holding(engine, {"envmgr-alpha"})   # nor may another image's label let it learn them
        killed, seen = _build_until(faults, mirror_a.url, point, delay)
        assert killed, f"never reached {point!r}: {seen}"
        tried += 1
        time.sleep(0.5)
        tagged.update(_tags(engine))
        _cache_is_sound(faults.cache_dir)
        orphaned += _leftover_containers(engine)
        survived += 1
    built = _done(faults.envmgr("--json", "build", NAME, mirror=mirror_a.url))
    assert _tags(engine)[built["tag"]] == built["image"]
    # any tag a killed build left names the complete image (the engine tags only after a whole load)
    assert set(tagged.values()) <= {built["image"]}, tagged
    ran = _done(faults.envmgr("--json", "run", NAME, "--gpus", "none"))
    assert ran["run_id"]

    # A damaged cache entry (same size, one byte changed) is found by its hash and made again: the
    # image is the same as before, not one built from the damaged bytes.
    env_tar = max((faults.cache_dir / "store" / "layers").glob("[0-9a-f]*"), key=lambda p: p.stat().st_size)
    data = bytearray(env_tar.read_bytes())
    data[len(data) // 2] ^= 0x01
    env_tar.write_bytes(bytes(data))
    again = faults.envmgr("--json", "build", "--force", NAME, mirror=mirror_a.url)
    assert "is damaged" in again.stdout and _done(again)["image"] == built["image"]
    _cache_is_sound(faults.cache_dir)
    print(f"\nSIGKILL faults: {tried} tried, {survived} survived, 0 lost; install containers left running by a "
          f"killed build (removed by the test; gc removes stopped ones): {orphaned}")


def test_full_disk_under_the_build_cache_is_one_line_and_leaves_nothing_half_made(faults, mirror_a, engine,
                                                                                   tmp_path):
    faults.envmgr("lock", NAME, mirror=mirror_a.url)
    full = tmp_path / "full-cache"
    full.mkdir()
    outcomes = []
    for size in ("64k", "128k", "192k"):   # a whole tiny build needs about 200 KiB of cache
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(full)], check=True)
        try:
            proc = faults.envmgr("build", NAME, mirror=mirror_a.url, check=False, ENVMGR_CACHE_DIR=str(full))
            errors = error_lines(proc.stderr)
            outcomes.append((size, proc.returncode, errors[:1]))
            assert proc.returncode == 1, (size, proc.stdout, proc.stderr)
            assert "disk full" in proc.stderr and "nothing was tagged" in proc.stderr, proc.stderr
            assert "Traceback" not in proc.stderr and len(errors) <= 2, proc.stderr
            assert not _tags(engine)
            assert not list(full.rglob("*.partial")), "a partial file was left"
            _cache_is_sound(full)
        finally:
            subprocess.run(["umount", str(full)], check=True)
    _leftover_containers(engine)
    built = _done(faults.envmgr("--json", "build", NAME, mirror=mirror_a.url))
    assert _tags(engine)[built["tag"]] == built["image"]
    print(f"\nfull-disk faults (build cache): {outcomes}")


def test_two_builds_at_once_make_one_image_and_four_runs_at_once_are_four_runs(faults, mirror_a, engine):
    faults.envmgr("lock", NAME, mirror=mirror_a.url)
    with ThreadPoolExecutor(2) as pool:
        builds = list(pool.map(lambda _: faults.envmgr("--json", "build", NAME, mirror=mirror_a.url,
                                                          check=False), range(2)))
    assert all(b.returncode == 0 for b in builds), [b.stderr for b in builds]
    results = [_done(b) for b in builds]
    assert results[0]["image"] == results[1]["image"]
    assert sorted(r["reused"] for r in results) == [False, True], "both builds assembled an image"
    assert set(_tags(engine).values()) == {results[0]["image"]}

    with ThreadPoolExecutor(4) as pool:
        runs = list(pool.map(lambda _: faults.envmgr("--json", "run", NAME, "--gpus", "none", check=False),
                             range(4)))
    assert all(r.returncode == 0 for r in runs), [r.stderr for r in runs]
    run_ids = {_done(r)["run_id"] for r in runs}
    assert len(run_ids) == 4
    listed = json.loads([line for line in faults.envmgr("--json", "runs").stdout.splitlines()
                         if '"event": "runs"' in line][-1])["runs"]
    assert {r["run_id"] for r in listed if r["status"] == "succeeded"} >= run_ids
    print(f"\nconcurrency: 2 builds -> 1 image; 4 runs -> {len(run_ids)} distinct successful runs")


@pytest.fixture(autouse=True)
def _no_stray_mounts(tmp_path):
    yield
    for mount in Path("/proc/mounts").read_text().splitlines():
        point = mount.split()[1]
        if point.startswith(str(tmp_path)):
            subprocess.run(["umount", point], check=False)   # only our own tmpfs under this test's tmp_path


FILLER = "tiny-fullrun"   # a method that checkpoints until the disk is full (its own image name)
FILLER_MAIN = """\
import os, sys
out = os.environ["ENVMGR_OUTPUT_DIR"]
cleanup = os.environ.get("FILL_CLEANUP", "1") == "1"
for step in range(1, 1000):
    temporary = os.path.join(out, f".checkpoint-{step}.tmp")
    try:
        with open(temporary, "wb") as handle:
            handle.write(os.urandom(256 * 1024))
        os.replace(temporary, os.path.join(out, f"checkpoint-{step}"))
        print(f"checkpoint {step}", flush=True)
    except OSError as error:
        if cleanup:
            os.unlink(temporary)
        print(f"checkpoint {step} failed: {error}", file=sys.stderr, flush=True)
        for line in range(200 if not cleanup else 0):   # a crashing method that keeps talking
            print(f"still here {line} " + "x" * 200, flush=True)
        sys.exit(1)
"""


@pytest.mark.parametrize("cleanup", [True, False], ids=["method-cleans-up", "method-leaves-its-temp"])
def test_full_disk_during_a_runs_checkpoints_is_recorded_with_where_and_keeps_earlier_ones(workspace, mirror_a,
                                                                                             engine, cleanup):
    folder = workspace.base_dir / "methods" / FILLER
    folder.mkdir(parents=True)
    (folder / "envmgr.toml").write_text(TINY_SPEC.replace('name = "tiny"', f'name = "{FILLER}"'))
    (folder / "pyproject.toml").write_text(TINY_PYPROJECT)
    (folder / "main.py").write_text(FILLER_MAIN)
    workspace.envmgr("lock", FILLER, mirror=mirror_a.url)
    workspace.envmgr("build", FILLER, mirror=mirror_a.url)
    runs = workspace.base_dir / "runs"
    runs.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(runs)], check=True)
    try:
        proc = workspace.envmgr("run", FILLER, "--gpus", "none", "--env", f"FILL_CLEANUP={int(cleanup)}", check=False)
        errors = error_lines(proc.stderr)
        assert proc.returncode == 1, (proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr and len(errors) <= 2, proc.stderr
        assert "failed (disk full): no space left on " + str(runs) in errors[0], proc.stderr
        run_dir = next((runs / FILLER).iterdir())
        record = json.loads((run_dir / "run.json").read_text())
        assert record["status"] == "failed" and record["reason"] == "disk full" and record["exit_code"] == 1
        assert record["disk_full"]["filesystem"] == str(runs)
        assert "No space left on device" in (record["disk_full"]["said"] or record["disk_full"]["log_error"])
        output = run_dir / "output"
        kept = sorted(output.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        assert len(kept) >= 3 and all(p.stat().st_size == 256 * 1024 for p in kept)   # earlier ones whole
        assert [int(p.name.split("-")[1]) for p in kept] == list(range(1, len(kept) + 1))
        left = [p.name for p in output.iterdir() if p.name.startswith(".")]
        assert left == ([] if cleanup else [f".checkpoint-{len(kept) + 1}.tmp"])   # only the method's own temp
        assert not list(run_dir.glob(".envmgr-*")) and not list(run_dir.glob(".run.json.*"))
        log = (run_dir / "log.txt").read_text()
        assert "checkpoint 1" in log
        print(f"\nfull-disk fault (run checkpoints, {'cleans up' if cleanup else 'leaves its temp'}): "
              f"{len(kept)} checkpoints kept whole; envmgr said: {errors[0]!r}; log write error: "
              f"{record['disk_full']['log_error']}")
    finally:
        subprocess.run(["umount", str(runs)], check=True)
