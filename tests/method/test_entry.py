"""sd-demo.py as the platform runs it: sd-demo.py -> bash train.sh -> accelerate launch -> trainer."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import make_sample_dataset
import pytest
from conftest import METHOD_DIR, events_of, run_entry

FAST = ["--resolution=64", "--lora_rank=4", "--validation_num_inference_steps=2", "--learning_rate=1e-3"]


def read_only_copy(tmp_path: Path) -> Path:
    """The method folder as it is in the image: owned by someone else, not writable."""
    method = tmp_path / "method"
    shutil.copytree(METHOD_DIR, method, ignore=shutil.ignore_patterns("__pycache__", "tests", "bench"))
    for path in [method, *method.rglob("*")]:
        mode = path.stat().st_mode
        path.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    return method


def test_platform_entry_trains_end_to_end(tmp_path, tiny_model, sample_zip):
    method = read_only_copy(tmp_path)
    method_files = sorted(method.rglob("*"))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    env = {"ENVMGR_OUTPUT_DIR": str(run_dir / "output"), "HOME": str(tmp_path / "no-such-home")}
    args = [f"--model_path={tiny_model}", f"--pic_relative_path={sample_zip}", "--train_id=run-1",
            "--max_steps", "4", "--batch_size=2", "--warmup_steps=1", *FAST]
    result = run_entry(args, cwd=run_dir, env=env, method_dir=method)
    assert result.returncode == 0, result.stderr[-3000:]

    events = events_of(result.stdout)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "dataset" and kinds[-1] == "done"
    assert events[0]["images"] == 8 and events[0]["upscaled"] == 0
    progress = [e for e in events if e["event"] == "progress"]
    assert [e["step"] for e in progress] == [1, 2, 3, 4]
    assert all(set(e) == {"event", "step", "max_steps", "loss", "lr", "s_per_step"} for e in progress)
    assert "checkpoint" in kinds and "validation" in kinds

    output = run_dir / "output"
    assert (output / "pytorch_lora_weights.safetensors").is_file()
    assert (output / "loss.png").is_file() and (output / "metrics.jsonl").is_file()
    assert list((output / "validation_images").glob("*.png"))
    assert list(output.glob("checkpoint-*"))
    work = run_dir / "sd-demo-work"
    config = json.loads((work / "config" / "config.json").read_text())
    assert config["--model_family"] == "sd3" and config["--max_train_steps"] == 4
    backends = json.loads((work / "config" / "multidatabackend.json").read_text())
    assert backends[0]["caption_strategy"] == "textfile" and backends[1]["dataset_type"] == "text_embeds"
    assert "MIXED_PRECISION" in (work / "config" / "config.env").read_text()
    assert sorted(method.rglob("*")) == method_files  # nothing written next to sd-demo.py


@pytest.mark.parametrize("argument, name", [
    ("--max_steps=abc", "--max_steps"),
    ("--max_steps=0", "--max_steps"),
    ("--batch_size=1.5", "--batch_size"),
    ("--learning_rate=-1", "--learning_rate"),
    ("--learning_rate=nan", "--learning_rate"),
    ("--warmup_steps=-3", "--warmup_steps"),
    ("--resolution=100", "--resolution"),
    ("--lora_rank=0", "--lora_rank"),
])
def test_bad_arguments_give_one_line_naming_the_argument_and_exit_2(tmp_path, argument, name):
    result = run_entry(["--model_path=/m", "--pic_relative_path=/d", "--train_id=x", argument], cwd=tmp_path)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and name in result.stderr


def test_missing_required_argument(tmp_path):
    result = run_entry(["--pic_relative_path=/d", "--train_id=x"], cwd=tmp_path)
    assert result.returncode == 2 and "--model_path" in result.stderr


@pytest.mark.parametrize("layout, message", [
    ("missing", "does not exist"),
    ("empty", "no model_index.json"),
    ("sdxl", "StableDiffusionXLPipeline"),
])
def test_bad_model_folder_is_one_clear_line(tmp_path, sample_zip, layout, message):
    model = tmp_path / "model"
    if layout != "missing":
        model.mkdir()
    if layout == "sdxl":
        (model / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    result = run_entry([f"--model_path={model}", f"--pic_relative_path={sample_zip}", "--train_id=x"], cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("sd-demo: error:") and message in result.stderr


@pytest.mark.parametrize("kind", ["missing", "text", "slip", "junk"])
def test_bad_dataset_is_one_clear_line_and_writes_nothing_outside(tmp_path, tiny_model, kind):
    import zipfile

    dataset = tmp_path / "in" / "data.zip"
    dataset.parent.mkdir()
    if kind == "text":
        dataset.write_text("not a zip")
    elif kind == "slip":
        with zipfile.ZipFile(dataset, "w") as archive:
            archive.writestr("../../escaped.txt", "x")
    elif kind == "junk":
        with zipfile.ZipFile(dataset, "w") as archive:
            archive.writestr("__MACOSX/._a.jpg", "x")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    result = run_entry([f"--model_path={tiny_model}", f"--pic_relative_path={dataset}", "--train_id=x"], cwd=run_dir)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("sd-demo: error:") and "data.zip" in last
    outside = {p.name for p in tmp_path.iterdir()} - {"in", "run"}
    assert not outside and not (tmp_path / "escaped.txt").exists()


def test_minimum_image_size_rejecting_every_image_is_an_error_naming_the_filter(tmp_path, tiny_model, sample_zip):
    result = run_entry([f"--model_path={tiny_model}", f"--pic_relative_path={sample_zip}", "--train_id=x",
                        "--max_steps=2", "--minimum_image_size=1024", *FAST], cwd=tmp_path)
    assert result.returncode == 1
    assert "minimum_image_size=1024" in result.stderr.strip().splitlines()[-1]
    assert any(e["event"] == "error" for e in events_of(result.stdout))
    assert not (tmp_path / "output" / "pytorch_lora_weights.safetensors").exists()


def test_small_images_are_upscaled_and_counted(tmp_path, tiny_model):
    dataset = make_sample_dataset.write_dataset(tmp_path / "small.zip", "zip", count=3, size=32)
    result = run_entry([f"--model_path={tiny_model}", f"--pic_relative_path={dataset}", "--train_id=x",
                        "--max_steps=1", "--validation_steps=0", *FAST], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    dataset_event = next(e for e in events_of(result.stdout) if e["event"] == "dataset")
    assert dataset_event["upscaled"] == 3 and "upscaled" in result.stderr


def _final_loss(stdout: str) -> float:
    return next(e for e in events_of(stdout) if e["event"] == "done")["final_loss"]


def test_sigterm_saves_a_checkpoint_and_resume_reaches_the_same_loss(tmp_path, tiny_model, sample_zip):
    args = [f"--model_path={tiny_model}", f"--pic_relative_path={sample_zip}", "--train_id=x", "--max_steps=40",
            "--batch_size=4", "--resolution=128", "--lora_rank=4", "--validation_steps=0", "--checkpointing_steps=0",
            "--learning_rate=1e-3", "--lr_scheduler=cosine", "--warmup_steps=5"]
    (tmp_path / "straight").mkdir()
    straight = run_entry(args, cwd=tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-2000:]

    run_dir = tmp_path / "split"
    run_dir.mkdir()
    env = {key: value for key, value in os.environ.items() if key not in ("ENVMGR_OUTPUT_DIR", "SD_DEMO_WORK_DIR")}
    process = subprocess.Popen([sys.executable, str(METHOD_DIR / "sd-demo.py"), *args], cwd=run_dir, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if '"event": "progress"' in line and json.loads(line)["step"] >= 3:
            process.send_signal(signal.SIGTERM)
            break
    rest, stderr = process.communicate(timeout=120)
    events = events_of("".join(lines) + rest)
    assert process.returncode == 130, stderr[-2000:]
    interrupted = next(e for e in events if e["event"] == "interrupted")
    assert interrupted["checkpoint"] and Path(interrupted["checkpoint"]).is_dir()
    assert interrupted["step"] < 40

    resumed = run_entry([*args, "--resume"], cwd=run_dir)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    resume_event = next(e for e in events_of(resumed.stdout) if e["event"] == "resume")
    assert resume_event["step"] == interrupted["step"]
    assert _final_loss(resumed.stdout) == pytest.approx(_final_loss(straight.stdout), rel=1e-5)
