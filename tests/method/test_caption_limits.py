"""A huge caption (5 MB seen in the wild) is cut with one warning and never printed whole."""

from __future__ import annotations

import logging

from conftest import run_entry, textfile_dataset, write_trainer_config
from sd_trainer import data
from sd_trainer.config import load_config, short
from sd_trainer.dataset_prep import MAX_CAPTION_CHARS, cap_caption

HUGE = "tag " * (5 * 1024 * 1024 // 4)


def test_cap_caption_cuts_at_a_word_boundary():
    text, cut = cap_caption("word " * 1000, limit=102)
    assert cut and len(text) <= 102 and text.endswith("word")
    assert cap_caption("short caption") == ("short caption", False)


def test_trainer_cuts_long_captions_with_one_bounded_warning(tmp_path, caplog):
    images = textfile_dataset(tmp_path / "images", count=3)
    for number in (0, 1):
        (images / f"img{number}.txt").write_text(HUGE)
    with caplog.at_level(logging.WARNING, logger="sd_trainer"):
        samples = data.discover(load_config(write_trainer_config(tmp_path, tmp_path / "m", images)), {})
    assert all(len(s.caption) <= MAX_CAPTION_CHARS for s in samples)
    warnings = [r.getMessage() for r in caplog.records if "cut" in r.getMessage()]
    assert len(warnings) == 1 and "2 caption(s)" in warnings[0] and len(warnings[0]) < 500


def test_short_keeps_log_values_bounded():
    assert len(short(HUGE)) < 120 and short("x") == "'x'"


def test_entry_with_a_5mb_caption_prints_only_short_lines(tmp_path, tiny_model):
    images = textfile_dataset(tmp_path / "dataset", count=2)
    (images / "img0.txt").write_text(HUGE)
    (tmp_path / "run").mkdir()
    result = run_entry([f"--model_path={tiny_model}", f"--pic_relative_path={images}", "--train_id=x",
                        "--max_steps=1", "--resolution=64", "--lora_rank=4", "--validation_num_inference_steps=1"],
                       cwd=tmp_path / "run")
    assert result.returncode == 0, result.stderr[-2000:]
    longest = max((result.stdout + result.stderr).splitlines(), key=len)
    assert len(longest) < 2000, longest[:300]
    assert "caption(s) longer than" in result.stderr
    written = (tmp_path / "run" / "sd-demo-work" / "dataset" / "img0.txt").read_text()
    assert len(written) <= MAX_CAPTION_CHARS + 1
