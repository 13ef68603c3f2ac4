"""sd-demo through Slurm with the real image (slow: its cold build downloads ~3.5 GB): a CPU run on the
tiny model to a LoRA, and two machines of one accelerate run (two tasks on the one node, each in its own
container, gloo on the CPU, rendezvous on 127.0.0.1) training one LoRA together."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.integration.test_run_sd_demo import REPO, sd_base  # noqa: F401 - the built image + tiny model
from tests.support.slurm import slurm_cluster  # noqa: F401

pytestmark = [pytest.mark.engine, pytest.mark.slow]
ARGS = ["--", "--max_steps=4", "--resolution=64", "--checkpointing_steps=2", "--validation_steps=0"]


@pytest.fixture(scope="module", autouse=True)
def _drop_the_export(sd_base):  # noqa: F811
    """The submission exports the image (~5 GB) into the base dir for the nodes: removed afterwards."""
    yield
    shutil.rmtree(sd_base[0] / "exports", ignore_errors=True)


def _envmgr(env, cluster, *args):
    proc = subprocess.run([sys.executable, "-m", "envmgr", "--json", *args], env={**env, **cluster.env},
                          capture_output=True, text=True, cwd=REPO, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    done = [json.loads(line) for line in proc.stdout.splitlines() if '"done"' in line][-1]
    return done


def test_sd_demo_on_slurm_on_the_cpu_trains_a_lora(sd_base, slurm_cluster, engine):  # noqa: F811
    base_dir, env, _ = sd_base
    done = _envmgr(env, slurm_cluster, "run", "sd-demo", "--on", "slurm", "--gpus-per-node", "0", "--wait",
                   "--model", "tiny-sd3", "--dataset", "sample.zip", *ARGS)
    run_dir = base_dir / "runs" / "sd-demo" / done["run_id"]
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "succeeded" and record["scheduler"]["kind"] == "slurm"
    assert (run_dir / "output" / "pytorch_lora_weights.safetensors").is_file()
    assert not engine.containers.list(all=True, filters={"label": f"org.envmgr.run-id={done['run_id']}"})


def test_two_machines_train_one_lora_with_world_size_two(sd_base, slurm_cluster, engine):  # noqa: F811
    base_dir, env, _ = sd_base
    done = _envmgr(env, slurm_cluster, "run", "sd-demo", "--on", "slurm", "--gpus-per-node", "0",
                   "--tasks-per-node", "2", "--wait", "--model", "tiny-sd3", "--dataset", "sample.zip", *ARGS)
    run_dir = base_dir / "runs" / "sd-demo" / done["run_id"]
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "succeeded" and record["network"] == "host"
    assert json.loads((run_dir / "run-rank1.json").read_text())["status"] == "succeeded"
    for log in ("log.txt", "log-rank1.txt"):     # one gloo group of two machines, not two lone trainers
        assert "2 process(es)" in (run_dir / log).read_text()
    assert (run_dir / "work").is_dir() and (run_dir / "work-rank1").is_dir()
    assert (run_dir / "output" / "pytorch_lora_weights.safetensors").is_file()
    assert not engine.containers.list(all=True, filters={"label": f"org.envmgr.run-id={done['run_id']}"})
