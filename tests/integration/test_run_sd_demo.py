"""`envmgr run sd-demo` with the real sd-demo image (torch, diffusers, peft: a slow first build),
a tiny SD3 model built locally and a platform-format dataset zip."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from envmgr.core.config import load_config
from envmgr.core.ui import Reporter
from envmgr.door.context import Context
from envmgr.face.demo import _tool

pytestmark = [pytest.mark.engine, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("ENVMGR_TEST_CACHE", "/var/tmp/envmgr-test-cache"))


@pytest.fixture(scope="module")
def sd_base(store, tmp_path_factory):
    """A base dir with the tiny model and a sample dataset, and the sd-demo image built."""
    base_dir = tmp_path_factory.mktemp("sd-base")
    env = {**os.environ, "ENVMGR_BASE_DIR": str(base_dir), "ENVMGR_CACHE_DIR": str(CACHE),
           "ENVMGR_STORE_DIR": str(store), "ENVMGR_CONFIG": "/dev/null"}
    built = subprocess.run([sys.executable, "-m", "envmgr", "--json", "build", "sd-demo"], env=env,
                           capture_output=True, text=True, cwd=REPO)
    assert built.returncode == 0, built.stderr
    tag = [json.loads(line) for line in built.stdout.splitlines() if '"done"' in line][-1]["tag"]
    ctx = Context(load_config({"base_dir": str(base_dir), "cache_dir": str(CACHE)}, files=[]), Reporter("plain"))
    (base_dir / "models").mkdir()
    (base_dir / "datasets").mkdir()
    _tool(ctx, tag, "make_tiny_model.py", base_dir / "models", ["/envmgr/out/tiny-sd3"])
    _tool(ctx, tag, "make_sample_dataset.py", base_dir / "datasets", ["/envmgr/out/sample.zip", "--count", "6"])
    return base_dir, env, tag


def _envmgr(env, *args, check=True):
    proc = subprocess.run([sys.executable, "-m", "envmgr", *args], env=env, capture_output=True, text=True,
                          cwd=REPO, timeout=1800)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


ARGS = ["--", "--max_steps=6", "--resolution=64", "--checkpointing_steps=3", "--validation_steps=6",
        "--validation_num_inference_steps=2"]


def test_run_on_cpu_leaves_lora_record_and_plots_owned_by_the_run_user(sd_base, engine):
    base_dir, env, _ = sd_base
    proc = _envmgr(env, "--json", "run", "sd-demo", "--model", "tiny-sd3", "--dataset", "sample.zip",
                   "--gpus", "none", *ARGS)
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    progress = [e for e in events if e.get("event") == "method.progress"]
    assert progress and progress[-1]["step"] == 6
    done = [e for e in events if e.get("event") == "done"][-1]
    run_dir = Path(done["run_dir"])
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "succeeded" and record["exit_code"] == 0
    assert record["model"]["hash"].startswith("sha256:") and record["dataset"]["name"] == "sample.zip"
    assert record["image"]["id"].startswith("sha256:") and len(record["lock_hash"]) == 64
    lora = run_dir / "output" / "pytorch_lora_weights.safetensors"
    assert lora.is_file() and (run_dir / "output" / "loss.png").is_file()
    assert list((run_dir / "output" / "validation_images").glob("*.png"))
    assert "step" in (run_dir / "log.txt").read_text()
    # envmgr as root runs the method as nobody (no sudo caller here): its outputs are that user's,
    # the record and log are envmgr's
    run_uid = int(record["run_as"].split(":")[0])
    assert run_uid == (os.getuid() if os.getuid() != 0 else int(os.environ.get("SUDO_UID") or 65534))
    for path in (lora, run_dir / "output"):
        assert path.stat().st_uid == run_uid
    assert (run_dir / "log.txt").stat().st_uid == (run_dir / "run.json").stat().st_uid == os.getuid()
    assert not engine.containers.list(all=True, filters={"label": "org.envmgr.kind=run"})
    listed = _envmgr(env, "--json", "runs")
    assert record["run_id"] in listed.stdout


def test_model_mount_is_read_only(sd_base, engine):
    _, _, tag = sd_base
    base_dir = sd_base[0]
    with pytest.raises(Exception) as denied:
        engine.containers.run(tag, ["sh", "-c", "touch /envmgr/models/tiny-sd3/x"], remove=True,
                              network_mode="none", user=f"{os.getuid()}:{os.getgid()}",
                              volumes={str(base_dir / "models" / "tiny-sd3"): {"bind": "/envmgr/models/tiny-sd3",
                                                                               "mode": "ro"}})
    assert "Read-only file system" in str(denied.value.stderr)


def test_method_cannot_write_to_its_model(sd_base):
    """The run's own mounts: a method that writes into its model folder fails."""
    base_dir, env, _ = sd_base
    proc = _envmgr(env, "run", "sd-demo", "--model", "tiny-sd3", "--dataset", "sample.zip", "--gpus", "none",
                   "--", "--output_dir=/envmgr/models/tiny-sd3/out", "--max_steps=1", "--resolution=64", check=False)
    assert proc.returncode != 0
    assert "Read-only file system" in (Path(proc.stderr.split("log: ")[1].split(")")[0].split()[0]).read_text()
                                       if "log: " in proc.stderr else proc.stderr)
    assert not (base_dir / "models" / "tiny-sd3" / "out").exists()


def test_gpus_without_nvidia_runtime_fails_first_and_leaves_nothing(sd_base, engine):
    _, env, _ = sd_base
    before = len(list((sd_base[0] / "runs").glob("sd-demo/*"))) if (sd_base[0] / "runs").exists() else 0
    proc = _envmgr(env, "run", "sd-demo", "--model", "tiny-sd3", "--dataset", "sample.zip", "--gpus", "all",
                   check=False)
    assert proc.returncode == 2
    assert "NVIDIA Container Toolkit" in proc.stderr and "--gpus none" in proc.stderr
    assert not engine.containers.list(all=True, filters={"label": "org.envmgr.kind=run"})
    assert not engine.containers.list(all=True, filters={"label": "org.envmgr.kind=gpu-probe"})
    assert len(list((sd_base[0] / "runs").glob("sd-demo/*"))) == before


def test_unknown_model_lists_what_is_there(sd_base):
    _, env, _ = sd_base
    proc = _envmgr(env, "run", "sd-demo", "--model", "nope", "--gpus", "none", check=False)
    assert proc.returncode == 2 and "tiny-sd3" in proc.stderr


def test_ctrl_c_records_interrupted_keeps_checkpoint_and_resume_finishes(sd_base, engine):
    base_dir, env, _ = sd_base
    proc = subprocess.Popen([sys.executable, "-m", "envmgr", "--json", "run", "sd-demo", "--model", "tiny-sd3",
                             "--dataset", "sample.zip", "--gpus", "none", "--", "--max_steps=400",
                             "--resolution=64", "--checkpointing_steps=1000", "--validation_steps=0"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    run_id = None
    deadline = time.monotonic() + 600
    assert proc.stdout
    for line in proc.stdout:
        if '"run_id"' in line and run_id is None:
            run_id = json.loads(line).get("run_id")
        if '"step": 5,' in line or '"step": 5}' in line:
            break
        assert time.monotonic() < deadline
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=300)
    assert proc.returncode == 130
    run_dir = base_dir / "runs" / "sd-demo" / run_id
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "interrupted"
    assert list((run_dir / "output").glob("checkpoint-*")), "no checkpoint saved on interrupt"
    assert not engine.containers.list(all=True, filters={"label": "org.envmgr.kind=run"})

    resumed = _envmgr(env, "--json", "run", "sd-demo", "--resume", run_id, "--gpus", "none", "--",
                      "--max_steps=400")
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "succeeded" and len(record["attempts"]) == 2
    assert (run_dir / "output" / "pytorch_lora_weights.safetensors").is_file()
    assert resumed.returncode == 0


def test_platform_conda_run_start_line_works_in_the_image(sd_base, engine):
    base_dir, _, tag = sd_base
    out = engine.containers.run(
        tag, ["conda", "run", "-n", "sd-demo", "python", "-c",
              "import torch, diffusers, peft, accelerate; print('ok', torch.__version__)"],
        remove=True, network_mode="none", user=f"{os.getuid()}:{os.getgid()}", environment={"HOME": "/tmp"})
    assert out.decode().startswith("ok 2.13.")


def test_image_labels_carry_the_gpu_facts_torch_reports(sd_base, engine):
    """Labels written at build (from the lock and torch's compile-time arch list) equal what torch says."""
    _, env, tag = sd_base
    labels = engine.images.get(tag).attrs["Config"]["Labels"]
    said = engine.containers.run(tag, ["python", "-c", "import torch; print(torch.__version__.split('+')[0], "
                                       "torch.version.cuda, ','.join(sorted(torch.cuda.get_arch_list())))"],
                                 remove=True, network_mode="none").decode().split()
    assert [labels["org.envmgr.torch"], labels["org.envmgr.cuda"], labels["org.envmgr.gpu-archs"]] == said
    assert labels["org.envmgr.cuda"] == "13.0" and labels["org.envmgr.cudnn"].startswith("9.")
    shown = _envmgr(env, "show", "sd-demo").stdout
    assert "default: needs NVIDIA driver ≥ 580 (CUDA 13.0); GPUs sm_" in shown
    assert "cu128: needs NVIDIA driver ≥ 525 (CUDA 12.8" in shown


def test_sbom_names_the_locked_torch_stack_and_the_base_images_debian_packages(sd_base, engine):
    """`envmgr sbom sd-demo`: CycloneDX JSON of the built image, versions as the lock and the image say."""
    _, env, tag = sd_base
    sbom = json.loads(_envmgr(env, "sbom", "sd-demo", "--format", "cyclonedx-json").stdout)
    assert sbom["bomFormat"] == "CycloneDX" and sbom["specVersion"] == "1.6"
    assert sbom["metadata"]["component"]["bom-ref"] == engine.images.get(tag).id
    versions = {c["name"]: c.get("version") for c in sbom["components"]}
    kinds = {c["purl"].split(":", 1)[1].split("/", 1)[0] for c in sbom["components"]}
    labels = engine.images.get(tag).attrs["Config"]["Labels"]
    lock = (REPO / "envs" / "sd-demo" / "poetry.lock").read_text()
    assert versions["torch"] == labels["org.envmgr.torch"]
    for name in ("diffusers", "peft", "accelerate", "transformers", "safetensors"):
        assert f'name = "{name}"\nversion = "{versions[name]}"' in lock, name
    assert kinds == {"pypi", "deb"} and versions["python3.11-minimal"].startswith("3.11.")
    with_hash = [c for c in sbom["components"] if c["purl"].startswith("pkg:pypi/") and c.get("hashes")]
    assert len(with_hash) == sum(1 for c in sbom["components"] if c["purl"].startswith("pkg:pypi/"))
    print(f"\nsd-demo SBOM: {len(sbom['components'])} components "
          f"({sum(1 for c in sbom['components'] if c['purl'].startswith('pkg:pypi/'))} Python, "
          f"{sum(1 for c in sbom['components'] if c['purl'].startswith('pkg:deb/'))} Debian)")


def test_environment_layers_equal_the_recorded_ones(sd_base, engine):
    """envs/sd-demo/env-layers.json holds sd-demo's environment layer digests; on a fresh machine (CI)
    this build is a clean-cache rebuild, so equal digests prove the layers depend only on the lock,
    the installer, Python and the layout. A lock or layout change updates the record: `make record-layers`."""
    from envmgr.build.layer_record import env_diff_ids

    _, _, tag = sd_base
    record = json.loads((REPO / "envs" / "sd-demo" / "env-layers.json").read_text())
    built = env_diff_ids(engine.images.get(tag).attrs["RootFS"]["Layers"])
    labels = engine.images.get(tag).attrs["Config"]["Labels"]
    assert record["lock"] == labels["org.envmgr.lock-hash"], "the lock changed: run `make record-layers`"
    assert built == [layer["diff_id"] for layer in record["layers"]], \
        "sd-demo's environment layers differ from envs/sd-demo/env-layers.json"
