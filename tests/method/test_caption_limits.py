"""A huge caption (5 MB seen in the wild) is cut with one warning and never printed whole."""

from __future__ import annotations

import logging

from conftest import textfile_dataset, write_trainer_config
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


# The end-to-end check (sd-demo.py with a 5 MB caption prints only short lines) rides on the
# knob run in test_knobs.py: test_a_5mb_caption_is_cut_and_never_printed.
