"""The trainer in-process: learning, LoRA loading, resume equivalence, atomic checkpoints."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import textfile_dataset, write_trainer_config
from sd_trainer import checkpoint
from sd_trainer.config import load_config
from sd_trainer.loop import StopFlag, train


def run_trainer(config_path: Path, stop=None) -> tuple[int, list[dict]]:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)  # each run builds its own Accelerator, as a fresh process would
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        code = train(load_config(config_path), stop or StopFlag())
    return code, [json.loads(line) for line in output.getvalue().splitlines() if line.startswith("{")]


def losses_of(events: list[dict]) -> list[float]:
    return [e["loss"] for e in events if e["event"] == "progress"]


@pytest.fixture(scope="module")
def memorised(tmp_path_factory, tiny_model):
    """40 steps on a single image: the LoRA must fit it."""
    folder = tmp_path_factory.mktemp("memorise")
    images = textfile_dataset(folder / "images", count=1)
    config = write_trainer_config(folder, tiny_model, images, max_train_steps=40, learning_rate=1e-2,
                                  train_batch_size=4, lora_rank=8, checkpointing_steps=0)
    code, events = run_trainer(config)
    return folder / "output", code, events


def test_memorisation_loss_is_finite_and_goes_down(memorised):
    _output, code, events = memorised
    losses = losses_of(events)
    assert code == 0 and len(losses) == 40
    assert all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-10:]) / 10 < 0.9 * sum(losses[:10]) / 10


def test_progress_events_have_the_documented_shape(memorised):
    _output, _code, events = memorised
    progress = [e for e in events if e["event"] == "progress"]
    assert set(progress[0]) == {"event", "step", "max_steps", "loss", "lr", "s_per_step"}
    assert [e["step"] for e in progress] == list(range(1, 41)) and progress[0]["max_steps"] == 40
    assert events[-1]["event"] == "done" and events[-1]["steps"] == 40


def test_saved_lora_loads_into_the_pipeline_and_changes_its_output(memorised, tiny_model):
    from diffusers import StableDiffusion3Pipeline

    output, _code, _events = memorised
    pipeline = StableDiffusion3Pipeline.from_pretrained(tiny_model)
    pipeline.set_progress_bar_config(disable=True)

    def render():
        return pipeline("a circle number 0", num_inference_steps=2, height=64, width=64, output_type="np",
                        generator=torch.Generator().manual_seed(0)).images[0]

    before = render()
    pipeline.load_lora_weights(output)
    after = render()
    assert abs(after - before).mean() > 1e-4


def test_outputs_are_written(memorised):
    output, _code, _events = memorised
    assert (output / "pytorch_lora_weights.safetensors").is_file()
    assert (output / "loss.png").stat().st_size > 1000
    assert len((output / "metrics.jsonl").read_text().splitlines()) == 40


def stop_before_step(step: int):
    """A stand-in for loop.stop_everywhere that acts like a SIGTERM arriving during step `step` - 1."""
    calls = []

    def stop_everywhere(_accelerator, _stop):
        calls.append(1)
        return len(calls) >= step

    return stop_everywhere


def test_resume_after_interrupt_matches_an_uninterrupted_run(tmp_path, tiny_model, monkeypatch):
    from sd_trainer import loop

    images = textfile_dataset(tmp_path / "images", count=3)
    options = dict(max_train_steps=6, train_batch_size=2, lr_scheduler="cosine", lr_warmup_steps=2,
                   gradient_accumulation_steps=2, caption_dropout_probability=0.3)
    _code, straight = run_trainer(write_trainer_config(tmp_path / "straight", tiny_model, images, **options))

    split = write_trainer_config(tmp_path / "split", tiny_model, images, **options)
    with monkeypatch.context() as patch:
        patch.setattr(loop, "stop_everywhere", stop_before_step(4))
        code, first = run_trainer(split)
    assert code == 130 and first[-1]["event"] == "interrupted" and first[-1]["step"] == 3
    assert (tmp_path / "split" / "output" / "checkpoint-3").is_dir()

    resumed = write_trainer_config(tmp_path / "split", tiny_model, images, resume_from_checkpoint="latest", **options)
    code, second = run_trainer(resumed)
    assert code == 0 and losses_of(second) and [e["step"] for e in second if e["event"] == "progress"] == [4, 5, 6]
    assert losses_of(second) == pytest.approx(losses_of(straight)[3:], rel=1e-5)
    assert second[-1]["final_loss"] == pytest.approx(straight[-1]["final_loss"], rel=1e-5)
    metrics = (tmp_path / "split" / "output" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in metrics] == [1, 2, 3, 4, 5, 6]


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, tiny_model, monkeypatch):
    images = textfile_dataset(tmp_path / "images", count=1)
    config = write_trainer_config(tmp_path, tiny_model, images, max_train_steps=4, checkpointing_steps=2)
    real_save = torch.save

    def failing_save(obj, target, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, target, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", failing_save)
    code, events = run_trainer(config)
    output = tmp_path / "output"
    assert code == 0
    assert any(e["event"] == "checkpoint_failed" and e["step"] == 4 for e in events)
    assert [step for step, _ in checkpoint.list_checkpoints(output)] == [2]
    assert not list(output.glob(".checkpoint-*"))
    assert checkpoint.resolve_resume(output, "latest") == output / "checkpoint-2"
