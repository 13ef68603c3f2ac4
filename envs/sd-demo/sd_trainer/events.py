"""Machine-readable progress: one JSON object per stdout line, each with an "event" key.

Only the main process prints (set by `set_main_process`). Human-readable logs go to stderr.
"""

from __future__ import annotations

import json
import math
import sys

_is_main = True


def set_main_process(is_main: bool) -> None:
    global _is_main
    _is_main = is_main


def _clean(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _clean(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(item) for item in value]
    return value


def emit(event: str, **fields) -> None:
    """Print `{"event": event, **fields}` as one line on stdout (main process only)."""
    if not _is_main:
        return
    sys.stdout.write(json.dumps({"event": event, **_clean(fields)}) + "\n")
    sys.stdout.flush()
