"""What a unit test needs to call layers.stage_units without an engine: a base image record, a context whose
step runner is the test's, and an empty staging folder."""

from __future__ import annotations

from pathlib import Path

from envmgr.core.config import load_config
from envmgr.core.ui import Reporter
from envmgr.door.context import Context
from envmgr.images.base import BaseImage


def stage_setup(tmp_path: Path, runner) -> tuple[Context, BaseImage, Path]:
    """(context with `runner` as its step runner, a bookworm-py311 base record, an empty staging folder)."""
    base = BaseImage(name="bookworm-py311", image_id="sha256:" + "b" * 64, diff_id="sha256:" + "d" * 64,
                     layer_path="/nonexistent", python="/usr/bin/python3.11", python_version="3.11.2", packages={})
    config = load_config({"cache_dir": str(tmp_path / "cache"), "base_dir": str(tmp_path / "base")}, files=[])
    ctx = Context(config=config, ui=Reporter("plain"), step_runner=runner)
    stage = tmp_path / "cache" / "envs" / "m-units-x"
    stage.mkdir(parents=True)
    return ctx, base, stage
