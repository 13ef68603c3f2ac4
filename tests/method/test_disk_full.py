"""A real full disk under the trainer's output dir (a small tmpfs; needs root to mount): checkpoints are written
until one does not fit, the earlier ones stay complete, nothing half written is left under a final name, and
the run ends with one line that says the disk is full and where."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import METHOD_DIR, textfile_dataset, write_trainer_config
from safetensors.torch import load_file
from sd_trainer import checkpoint

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


def _train(config: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(METHOD_DIR / "train.py"), "--config", str(config)],
                          capture_output=True, text=True, env=env, timeout=600)


def _tree_bytes(folder: Path) -> int:
    """What the files take on a tmpfs: whole 4 KiB pages."""
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in folder.rglob("*") if p.is_file())


def test_checkpoints_until_the_disk_is_full_leave_earlier_ones_whole_and_one_line(tmp_path, tiny_model):
    images = textfile_dataset(tmp_path / "images", count=1)
    options = dict(max_train_steps=8, checkpointing_steps=1, validation_steps=0)
    # the sizes this model's files take, measured on an ordinary disk
    reference = _train(write_trainer_config(tmp_path / "reference", tiny_model, images, max_train_steps=1,
                                            checkpointing_steps=1, validation_steps=0))
    assert reference.returncode == 0, reference.stderr
    output = tmp_path / "reference" / "output"
    one_checkpoint = _tree_bytes(output / "checkpoint-1")
    lora = _tree_bytes(output / checkpoint.LORA_FILE)
    assert lora < one_checkpoint

    # room for two checkpoints and half a LoRA: the third checkpoint and then the final LoRA do not fit
    full = tmp_path / "full"
    full.mkdir()
    size = 2 * one_checkpoint + lora // 2 + 8 * 4096
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(full)], check=True)
    try:
        config = write_trainer_config(tmp_path / "run", tiny_model, images, output_dir=str(full), **options)
        proc = _train(config)
        events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]

        assert proc.returncode == 1, proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("sd-trainer: error: cannot write ") and f" in {full}: " in last, last
        assert "No space left on device" in last and "checkpoint-" in last, last
        assert "Traceback" not in proc.stderr, proc.stderr
        assert events[-1]["event"] == "error"

        written = [e["step"] for e in events if e["event"] == "checkpoint"]
        failed = [e["step"] for e in events if e["event"] == "checkpoint_failed"]
        assert len(written) >= 2 and failed and min(failed) > max(written[:2]), (written, failed)
        kept = checkpoint.list_checkpoints(full)
        assert [step for step, _ in kept] == written
        for step, path in kept:                        # every kept checkpoint is whole and loads
            assert json.loads((path / checkpoint.META_FILE).read_text()) == {"step": step, "complete": True}
            assert load_file(str(path / checkpoint.PEFT_FILE)) and load_file(str(path / checkpoint.LORA_FILE))
            assert torch.load(path / checkpoint.STATE_FILE, map_location="cpu", weights_only=False)["step"] == step
        assert checkpoint.resolve_resume(full, "latest") == kept[-1][1]
        leftovers = [p.name for p in full.iterdir() if p.name.startswith(".")]
        assert not leftovers, leftovers                 # no temp folder or file left to fill the disk
        if (full / checkpoint.LORA_FILE).exists():     # the final LoRA fitted: it is whole
            assert load_file(str(full / checkpoint.LORA_FILE)).keys() == load_file(str(kept[-1][1] / checkpoint.LORA_FILE)).keys()
        if (full / "loss.png").exists():
            assert (full / "loss.png").read_bytes().endswith(b"IEND\xaeB`\x82")
        metrics = [line for line in (full / "metrics.jsonl").read_text().splitlines() if line.strip()]
        print(f"\ntrainer disk full: {len(written)} checkpoints kept, {len(failed)} refused; "
              f"{len(metrics)} metric lines; last line: {last}; ({len(errors)} error lines)")
    finally:
        subprocess.run(["umount", str(full)], check=True)


def test_a_full_disk_under_the_encode_cache_is_one_line_and_leaves_no_temporary_file(tmp_path, tiny_model):
    images = textfile_dataset(tmp_path / "images", count=2)
    config = write_trainer_config(tmp_path / "run", tiny_model, images, max_train_steps=2, validation_steps=0)
    full = tmp_path / "full"
    full.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(full)], check=True)
    try:
        with open(full / "filler", "wb", buffering=0) as filler:   # fill it to the last page
            try:
                while True:
                    filler.write(b"\0" * 4096)
            except OSError:
                pass
        backends = tmp_path / "run" / "multidatabackend.json"
        data = json.loads(backends.read_text())
        data[0]["cache_dir_vae"] = str(full / "vae")
        backends.write_text(json.dumps(data))
        proc = _train(config)
        assert proc.returncode == 1, proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert "cannot write the encode cache in " in last and "No space left on device" in last, last
        assert "Traceback" not in proc.stderr, proc.stderr
        leftovers = [p.name for p in full.rglob("*") if p.name.endswith(".tmp")]
        assert not leftovers, leftovers
    finally:
        subprocess.run(["umount", str(full)], check=True)
