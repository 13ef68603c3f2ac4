"""GPU contract on the container side: ENVMGR_GPUS refusal, train.sh `auto`, gradient checkpointing,
and a run that stops on repeated non-finite losses instead of saving a NaN LoRA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import METHOD_DIR, textfile_dataset, write_trainer_config
from sd_trainer import device


@pytest.mark.parametrize("value, wanted", [(None, None), ("", None), ("none", None), ("all", 0), ("2", 2),
                                           ("0,1", 2), ("3", 3)])
def test_requested_gpus(value, wanted):
    assert device.requested_gpus(value) == wanted


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where CUDA is not usable")
def test_trainer_refuses_when_gpus_were_asked_for_and_cuda_is_unusable(tmp_path, tiny_model):
    images = textfile_dataset(tmp_path / "images", count=1)
    config = write_trainer_config(tmp_path, tiny_model, images)
    env = {**os.environ, "ENVMGR_GPUS": "all", "SD_DEMO_STATUS_FILE": str(tmp_path / "status")}
    result = subprocess.run([sys.executable, str(METHOD_DIR / "train.py"), "--config", str(config)],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("sd-trainer: error: ENVMGR_GPUS=all asks for GPUs but CUDA is not usable: ")
    assert device.cuda_problem() in last  # torch's own words, not ours
    assert not (tmp_path / "output" / "pytorch_lora_weights.safetensors").exists()
    assert (tmp_path / "status").read_text().strip() == "1"


def test_no_gpu_request_allows_the_cpu():
    device.check_gpu_request({"ENVMGR_GPUS": "none"})
    device.check_gpu_request({})


# ---------------------------------------------------------------- train.sh auto


def fake_tools(folder: Path, gpus: int | None) -> dict:
    """A PATH with a fake nvidia-smi listing `gpus` GPUs (None: no nvidia-smi) and a Python that prints its args."""
    folder.mkdir(parents=True, exist_ok=True)
    if gpus is not None:
        lines = "\n".join(f"echo 'GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i:08d})'" for i in range(gpus))
        (folder / "nvidia-smi").write_text(f"#!/bin/bash\n[[ \"$1\" == -L ]] || exit 9\n{lines}\n")
        (folder / "nvidia-smi").chmod(0o755)
    (folder / "python").write_text('#!/bin/bash\necho "ARGS $*"\necho 0 > "$SD_DEMO_STATUS_FILE"\n')
    (folder / "python").chmod(0o755)
    return {"PATH": f"{folder}:/usr/bin:/bin", "SD_DEMO_PYTHON": str(folder / "python")}


def run_train_sh(tmp_path: Path, env: dict) -> subprocess.CompletedProcess:
    (tmp_path / "config").mkdir(exist_ok=True)
    (tmp_path / "config" / "config.json").write_text("{}")
    clean = {key: value for key, value in os.environ.items() if key not in ("CUDA_VISIBLE_DEVICES", "PATH")}
    return subprocess.run(["bash", str(METHOD_DIR / "train.sh")], cwd=tmp_path, capture_output=True, text=True,
                          env={**clean, "TRAINING_NUM_PROCESSES": "auto", **env}, timeout=60)


@pytest.mark.parametrize("gpus, visible, expected", [(2, None, 2), (4, None, 4), (4, "0,1,2", 3), (4, "3", 1),
                                                     (None, "0,1", 2), (2, "0,-1,1", 1)])
def test_auto_resolves_to_the_visible_gpus(tmp_path, gpus, visible, expected):
    env = fake_tools(tmp_path / "bin", gpus)
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    result = run_train_sh(tmp_path, env)
    assert result.returncode == 0, result.stderr
    assert f"--num_processes={expected} " in result.stdout


@pytest.mark.parametrize("gpus, visible", [(0, None), (None, None), (2, "-1")])
def test_auto_with_no_visible_gpu_is_a_clear_error(tmp_path, gpus, visible):
    env = fake_tools(tmp_path / "bin", gpus)
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    result = run_train_sh(tmp_path, env)
    assert result.returncode == 1 and "ARGS" not in result.stdout
    assert result.stderr.strip().splitlines()[-1].startswith("train.sh: error: TRAINING_NUM_PROCESSES=auto but no GPU is visible")


def test_a_number_is_passed_through(tmp_path):
    result = run_train_sh(tmp_path, {**fake_tools(tmp_path / "bin", 0), "TRAINING_NUM_PROCESSES": "3"})
    assert result.returncode == 0 and "--num_processes=3 " in result.stdout


# ---------------------------------------------------------------- gradient checkpointing


@pytest.mark.parametrize("configured, resolution, expected", [(None, 1024, True), (None, 768, True), (None, 512, False),
                                                              (None, 64, False), (False, 1024, False), (True, 64, True)])
def test_gradient_checkpointing_default(configured, resolution, expected):
    assert device.gradient_checkpointing_wanted(configured, resolution) is expected


def test_gradient_checkpointing_trains_the_same_losses(tmp_path, tiny_model, monkeypatch):
    from sd_trainer import model
    from test_training import losses_of, run_trainer

    enabled = []
    real_load = model.load_transformer

    def recording_load(*args, **kwargs):
        transformer = real_load(*args, **kwargs)
        real_enable = transformer.enable_gradient_checkpointing
        transformer.enable_gradient_checkpointing = lambda: (enabled.append(True), real_enable())
        return transformer

    monkeypatch.setattr(model, "load_transformer", recording_load)
    images = textfile_dataset(tmp_path / "images", count=2)
    plain = losses_of(run_trainer(write_trainer_config(tmp_path / "a", tiny_model, images, max_train_steps=3))[1])
    assert not enabled
    checkpointed = losses_of(run_trainer(write_trainer_config(tmp_path / "b", tiny_model, images, max_train_steps=3,
                                                              gradient_checkpointing=True))[1])
    assert enabled and checkpointed == pytest.approx(plain, rel=1e-5)


# ---------------------------------------------------------------- non-finite losses


def test_repeated_non_finite_losses_stop_the_run_without_a_lora(tmp_path, tiny_model, monkeypatch, capsys):
    from accelerate.state import AcceleratorState
    from sd_trainer import cli, loop

    real_loss = loop.Trainer.micro_step_loss

    def diverging(self, step, micro):
        loss = real_loss(self, step, micro)
        return loss * float("nan") if step >= 3 else loss

    monkeypatch.setattr(loop.Trainer, "micro_step_loss", diverging)
    images = textfile_dataset(tmp_path / "images", count=1)
    config = write_trainer_config(tmp_path, tiny_model, images, max_train_steps=20, checkpointing_steps=4)
    AcceleratorState._reset_state(True)
    assert cli.main(["--config", str(config)]) == 1
    captured = capsys.readouterr()
    events = [json.loads(line) for line in captured.out.splitlines() if line.startswith("{")]
    progress = [e for e in events if e["event"] == "progress"]
    assert [e["step"] for e in progress] == [1, 2, 3, 4, 5, 6]  # the 5th bad step (7) ends the run
    assert [e["loss"] for e in progress[2:]] == [None] * 4
    assert events[-1]["event"] == "error" and "5 consecutive steps" in events[-1]["message"]
    assert captured.err.strip().splitlines()[-1].startswith("sd-trainer: error: loss was not finite")
    output = tmp_path / "output"
    assert not (output / "pytorch_lora_weights.safetensors").exists()
    from safetensors.torch import load_file

    saved = load_file(str(output / "checkpoint-4" / "lora_peft.safetensors"))  # taken during the NaN streak
    assert all(torch.isfinite(value).all() for value in saved.values())


# ---------------------------------------------------------------- the GPU benchmark script


def test_gpu_bench_smoke_runs_on_the_cpu_with_tiny():
    result = subprocess.run([sys.executable, str(METHOD_DIR / "bench" / "gpu_bench.py"), "--tiny", "--json",
                             "--batches", "1", "2", "--steps", "1", "--warmup", "0"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout)
    assert [(row["batch"], row["checkpointing"]) for row in summary["rows"]] == [(1, False), (2, False), (1, True), (2, True)]
    assert all(row["s_per_step"] > 0 for row in summary["rows"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_gpu_bench_without_cuda_says_so_and_measures_nothing():
    result = subprocess.run([sys.executable, str(METHOD_DIR / "bench" / "gpu_bench.py")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert result.stdout.startswith("gpu_bench: no usable CUDA device (") and "nothing measured" in result.stdout
