"""Machine-readable progress: one JSON object per stdout line, each with an "event" key.

Only the main process prints (set by `set_main_process`). Human-readable logs go to stderr.
"""

from __future__ import annotations

import json
import math
import sys
import time

_is_main = True
PROGRESS_FLUSH_S = 0.5
_flushed = float("-inf")  # when stdout was last flushed


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
    """Print `{"event": event, **fields}` as one line on stdout (main process only).

    Every event is flushed at once except `progress`, which is flushed at most every
    PROGRESS_FLUSH_S (the first one at once): a step does not wait for a pipe per line.
    """
    global _flushed
    if not _is_main:
        return
    sys.stdout.write(json.dumps({"event": event, **_clean(fields)}) + "\n")
    now = time.monotonic()
    if event != "progress" or now - _flushed >= PROGRESS_FLUSH_S:
        sys.stdout.flush()
        _flushed = now
