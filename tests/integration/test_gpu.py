"""GPU truth against a real engine (this one has no NVIDIA runtime) and variants of a fixture method
locked through the loopback mirror."""

from __future__ import annotations

import json

import pytest

from tests.support.said import error_lines

pytestmark = pytest.mark.engine

VARIANT_SPEC = """
[variants.old]
description = "the older beta"
pin = { envmgr-beta = "1.0" }
"""


def _done(proc) -> dict:
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return [e for e in events if e.get("event") == "done"][-1]


def _assert_no_container_left(engine) -> None:
    """Nothing of this method's run and no GPU probe stays behind (the engine is shared: others' are not ours)."""
    assert not engine.containers.list(all=True, filters={"label": ["org.envmgr.method=tiny", "org.envmgr.kind=run"]})
    assert not engine.containers.list(all=True, filters={"label": "org.envmgr.kind=gpu-probe"})


def _with_variant(workspace) -> None:
    pyproject = workspace.method_dir / "pyproject.toml"
    pyproject.write_text(pyproject.read_text().replace('"envmgr-alpha>=1.0"', '"envmgr-alpha>=1.0", "envmgr-beta>=1.0"'))
    spec = workspace.method_dir / "envmgr.toml"
    spec.write_text(spec.read_text().replace('gpu = "none"', 'gpu = "optional"') + VARIANT_SPEC)


def test_variant_locks_beside_the_default_builds_its_own_image_and_runs(workspace, engine, mirror_a):
    _with_variant(workspace)
    workspace.envmgr("lock", "tiny", mirror=mirror_a.url)
    workspace.envmgr("lock", "tiny", "--variant", "old", mirror=mirror_a.url)
    default_lock = (workspace.method_dir / "poetry.lock").read_text()
    variant_lock = (workspace.method_dir / "variants" / "old" / "poetry.lock").read_text()
    assert 'name = "envmgr-beta"\nversion = "1.1"' in default_lock
    assert 'name = "envmgr-beta"\nversion = "1.0"' in variant_lock
    assert f"127.0.0.1:{mirror_a.port}" not in variant_lock
    assert workspace.envmgr("lock", "tiny", "--variant", "old", "--check").returncode == 0

    default = _done(workspace.envmgr("--json", "build", "tiny", mirror=mirror_a.url))
    old = _done(workspace.envmgr("--json", "build", "tiny", "--variant", "old", mirror=mirror_a.url))
    assert old["tag"].startswith("envmgr/tiny-old:") and default["tag"].startswith("envmgr/tiny:")
    assert old["image"] != default["image"]
    labels = engine.images.get(old["tag"]).attrs["Config"]["Labels"]
    assert labels["org.envmgr.variant"] == "old" and labels["org.envmgr.method"] == "tiny"
    # no torch in this method: no GPU facts are claimed
    assert not {"org.envmgr.torch", "org.envmgr.cuda", "org.envmgr.gpu-archs"} & set(labels)
    assert "org.envmgr.variant" not in engine.images.get(default["tag"]).attrs["Config"]["Labels"]
    # the variant's lock is not in either image's method files: locking it again rebuilds neither
    assert _done(workspace.envmgr("--json", "build", "tiny", mirror=mirror_a.url))["reused"]

    # each variant's current image is current, not a superseded image of the method
    gc = _done(workspace.envmgr("--json", "gc", "--keep", "0", "--method", "tiny", "--dry-run"))
    removed = {item["what"] for item in gc["removed"] if item["kind"] == "image"}
    assert not {default["image"], old["image"]} & removed

    for variant, greeting in [("old", "alpha+beta-1.0"), ("default", "alpha+beta-1.1")]:
        ran = _done(workspace.envmgr("--json", "run", "tiny", "--variant", variant, "--gpus", "none",
                                     mirror=mirror_a.url))
        run_dir = workspace.base_dir / "runs" / "tiny" / ran["run_id"]
        assert greeting in (run_dir / "log.txt").read_text()
        record = json.loads((run_dir / "run.json").read_text())
        assert record["gpu"]["variant"] == variant and "asked for" in record["gpu"]["why"]

    shown = workspace.envmgr("--json", "show", "tiny")
    variants = [json.loads(line) for line in shown.stdout.splitlines() if '"variants"' in line][-1]["variants"]
    assert [v["variant"] for v in variants] == ["default", "old"] and variants[1]["pins"] == {"envmgr-beta": "1.0"}


def test_stale_or_unknown_variant_is_one_line_with_the_fix(workspace, mirror_a):
    _with_variant(workspace)
    workspace.envmgr("lock", "tiny", "--variant", "old", mirror=mirror_a.url)
    spec = workspace.method_dir / "envmgr.toml"
    spec.write_text(spec.read_text().replace('envmgr-beta = "1.0"', 'envmgr-beta = "1.1"'))
    stale = workspace.envmgr("build", "tiny", "--variant", "old", check=False)
    assert stale.returncode == 3 and "envmgr lock tiny --variant old" in stale.stderr
    unknown = workspace.envmgr("run", "tiny", "--variant", "cu118", "--gpus", "none", check=False)
    assert unknown.returncode == 2 and "no variant 'cu118'" in unknown.stderr and "default, old" in unknown.stderr


def test_gpus_all_on_an_engine_without_nvidia_fails_with_the_toolkit_message_and_leaves_nothing(
        workspace, engine, mirror_a):
    _with_variant(workspace)
    workspace.envmgr("lock", "tiny", mirror=mirror_a.url)
    proc = workspace.envmgr("run", "tiny", "--gpus", "all", mirror=mirror_a.url, check=False)
    assert proc.returncode == 2
    assert "NVIDIA Container Toolkit" in proc.stderr and "--gpus none" in proc.stderr
    assert len(error_lines(proc.stderr)) <= 2
    _assert_no_container_left(engine)
    assert not list((workspace.base_dir / "runs").glob("tiny/*"))


@pytest.mark.parametrize("gpus, says", [("0", "--gpus none"), ("0,0", "twice"), ("-1", "expected all, none")])
def test_bad_gpus_flag_fails_before_any_container(workspace, engine, gpus, says):
    proc = workspace.envmgr("run", "tiny", "--gpus", gpus, check=False)
    assert proc.returncode == 2 and says in proc.stderr
    _assert_no_container_left(engine)
    assert not list((workspace.base_dir / "runs").glob("tiny/*"))
