"""`metrics.jsonl` (one record per step, survives resumes) and the `loss.png` plot."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

log = logging.getLogger("sd_trainer")


class MetricsLog:
    """Records are buffered and appended in batches (every FLUSH_RECORDS records or FLUSH_S seconds, and on
    `flush`: before a checkpoint, at the end): no per-step open, write and close on the step's path."""

    FLUSH_RECORDS = 100
    FLUSH_S = 5.0

    def __init__(self, path: Path, resume_step: int = 0):
        self.path = path
        kept = []
        if resume_step and path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line)
                except json.JSONDecodeError:
                    continue
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

        self.failed = False
        self._pending: list[tuple[int | None, str]] = []
        self._written = time.monotonic()

    def append(self, record: dict) -> None:
        self._pending.append((record.get("step"), json.dumps(record) + "\n"))
        if len(self._pending) >= self.FLUSH_RECORDS or time.monotonic() - self._written >= self.FLUSH_S:
            self.flush()

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        self._written = time.monotonic()
        if not pending:
            return
        try:
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write("".join(line for _step, line in pending))
        except OSError as error:   # a full disk: training goes on; the log says which steps are missing
            if not self.failed:
                log.error("cannot append to %s (%s): steps from %s on are not in it", self.path, error.strerror,
                          pending[0][0])
            self.failed = True

    def records(self) -> list[dict]:
        self.flush()
        found = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                found.append(json.loads(line))
            except json.JSONDecodeError:
                continue   # the last line half written when the disk filled
        return found


def plot_loss(records: list[dict], target: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed; no loss.png")
        return None
    steps = [r["step"] for r in records if r.get("loss") is not None]
    losses = [r["loss"] for r in records if r.get("loss") is not None]
    figure, axis = plt.subplots(figsize=(7, 4), dpi=100)
    axis.plot(steps, losses, linewidth=1, label="loss")
    if len(losses) >= 10:
        window = max(2, len(losses) // 20)
        smooth = [sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1]) for i in range(len(losses))]
        axis.plot(steps, smooth, linewidth=2, label=f"mean of {window}")
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    axis.set_title("SD3 LoRA training loss")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    temporary = target.with_name(f".{target.name}.tmp")
    try:
        figure.savefig(temporary, format=target.suffix.lstrip(".") or "png")
        os.replace(temporary, target)
    finally:
        plt.close(figure)
        temporary.unlink(missing_ok=True)
    return target
