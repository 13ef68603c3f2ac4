"""What every verb needs: the effective config, the output, (lazily) the engine, and the step runner."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from envmgr.core.config import EffectiveConfig
from envmgr.core.errors import EnvmgrError
from envmgr.core.ui import Reporter
from envmgr.door.engine import Engine
from envmgr.door.steps import StepRunner, run_in_container


@dataclass
class Context:
    config: EffectiveConfig
    ui: Reporter
    _engine: Engine | None = field(default=None, repr=False)
    step_runner: StepRunner = field(default=run_in_container, repr=False)  # runs the steps backends describe
    store: Path | None = field(default=None, repr=False)  # a store shared with another cache (verify's scratch)

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = Engine(self.config.engine_url)
        return self._engine

    @property
    def cache_dir(self) -> Path:
        return self.config.cache_dir

    @property
    def store_dir(self) -> Path:
        """Base rootfs layers and lock tools: content-addressed, safe to share between cache dirs."""
        if self.store is not None:
            return self.store
        value = os.environ.get("ENVMGR_STORE_DIR")
        return Path(value) if value else self.config.cache_dir / "store"

    def uv_binary(self) -> Path:
        try:
            from uv import find_uv_bin

            return Path(find_uv_bin())
        except (ImportError, FileNotFoundError):
            found = shutil.which("uv")
            if not found:
                raise EnvmgrError("uv is not installed next to envmgr",
                                  hint="reinstall envmgr: `make install` (uv is one of its dependencies)") from None
            return Path(found)
