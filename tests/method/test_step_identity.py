"""The data path changes nothing in the maths: losses and the saved LoRA are bit-identical.

`step_reference.json` holds the per-step losses (float.hex) and a digest of the saved LoRA's
tensors of one run, recorded with the trainer of main before the read-ahead data path
(commit b510ccd) on the tiny model this file builds:

    .venv-method/bin/python tests/method/test_step_identity.py --record

The runs here (read-ahead on and off) must reproduce it bit for bit. Float results can
differ between CPU instruction sets and torch builds, so the comparison with the recording
is skipped (saying why) where those differ; on/off are always compared with each other.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REFERENCE = HERE / "step_reference.json"
if __name__ == "__main__":  # --record: the same sys.path as conftest gives the tests
    sys.path.insert(0, str(HERE.parents[1] / "envs" / "sd-demo"))
    sys.path.insert(0, str(HERE.parents[1] / "envs" / "sd-demo" / "tools"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

# What the run exercises: two aspect buckets, accumulation, mirrored latents, caption dropout,
# a warmup + cosine schedule, a checkpoint on the way and a final LoRA.
OPTIONS = dict(max_train_steps=8, train_batch_size=2, gradient_accumulation_steps=2, random_flip=True,
               caption_dropout_probability=0.3, lr_scheduler="cosine", lr_warmup_steps=2, checkpointing_steps=4,
               learning_rate=1e-3, lora_rank=4, seed=11)


def dataset(folder: Path) -> Path:
    """Five images with captions: three square, two wide (a second bucket)."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    sizes = [(64, 64), (80, 80), (64, 64), (128, 64), (120, 60)]
    for index, (width, height) in enumerate(sizes):
        image = Image.new("RGB", (width, height), (30 + 40 * index, 90, 200 - 30 * index))
        ImageDraw.Draw(image).ellipse((width // 4, height // 4, 3 * width // 4, 3 * height // 4), fill=(220, 50, 40))
        image.save(folder / f"img{index}.png")
        (folder / f"img{index}.txt").write_text(f"a red circle number {index}")
    return folder


def trainer_config(folder: Path, model: Path, images: Path, **extra) -> Path:
    from conftest import write_trainer_config

    return write_trainer_config(folder, model, images, **{**OPTIONS, **extra})


class DataLines(logging.Handler):
    """The trainer's `data: ...` log line: how it read the batches."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("data: "):
            self.lines.append(record.getMessage())


def train_once(config_path: Path) -> dict:
    """One in-process run: the losses of metrics.jsonl (float.hex), a digest of the LoRA's tensors, the data line."""
    from accelerate.state import AcceleratorState
    from safetensors.torch import load_file
    from sd_trainer.config import load_config
    from sd_trainer.loop import StopFlag, train

    AcceleratorState._reset_state(True)
    handler = DataLines()
    trainer_log = logging.getLogger("sd_trainer")
    trainer_log.addHandler(handler)
    level, trainer_log.level = trainer_log.level, logging.INFO
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            code = train(load_config(config_path), StopFlag())
    finally:
        trainer_log.removeHandler(handler)
        trainer_log.setLevel(level)
    assert code == 0
    output = config_path.parent / "output"
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    digest = hashlib.sha256()
    for key, tensor in sorted(load_file(str(output / "pytorch_lora_weights.safetensors")).items()):
        digest.update(key.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.contiguous().view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
    return {"steps": [r["step"] for r in records], "losses": [float(r["loss"]).hex() for r in records],
            "lora_sha256": digest.hexdigest(), "data": handler.lines}


def platform() -> dict:
    import torch

    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads()}


def build_model(folder: Path) -> Path:
    import make_tiny_model

    make_tiny_model.build_pipeline(seed=0, layers=2).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model):
    """The same run with the read-ahead and the in-memory cache on (defaults) and off (each batch read on its step)."""
    base = tmp_path_factory.mktemp("identity")
    images = dataset(base / "images")
    on = train_once(trainer_config(base / "on", tiny_model, images))
    off = train_once(trainer_config(base / "off", tiny_model, images, dataloader_prefetch_qlen=0,
                                    cache_ram_budget_mb=0))
    return on, off


def test_read_ahead_on_and_off_give_bit_identical_losses_and_lora(runs):
    on, off = runs
    assert on["data"] and "4 micro-batches read ahead" in on["data"][0] and "kept in memory" in on["data"][0]
    assert off["data"] and "no read-ahead" in off["data"][0] and "read per batch" in off["data"][0]
    assert on["steps"] == list(range(1, OPTIONS["max_train_steps"] + 1))
    assert {**on, "data": None} == {**off, "data": None}


def test_losses_and_lora_are_those_main_recorded(runs):
    recorded = json.loads(REFERENCE.read_text())
    if recorded["platform"] != platform():
        pytest.skip(f"recorded on {recorded['platform']}, this is {platform()}: float results may differ")
    for run in runs:
        assert run["steps"] == recorded["steps"]
        assert run["losses"] == recorded["losses"]
        assert run["lora_sha256"] == recorded["lora_sha256"]


if __name__ == "__main__":
    import tempfile

    if sys.argv[1:] != ["--record"]:
        sys.exit(__doc__)
    sys.path.insert(0, str(HERE))
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        result = train_once(trainer_config(root / "run", build_model(root / "tiny-sd3"), dataset(root / "images")))
    result.pop("data")
    REFERENCE.write_text(json.dumps({"platform": platform(), **result}, indent=1) + "\n")
    print(REFERENCE.read_text())
