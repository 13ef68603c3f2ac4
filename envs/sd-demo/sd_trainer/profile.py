"""Where a step's time goes: wall time per phase (data, forward, backward, optimizer, logging).

Off by default (`NO_PROFILE`: the phases cost one shared no-op context each). The benches pass a
`StepProfile`; on a GPU it synchronizes around each phase so that the time of queued kernels lands
in the phase that queued them (that costs a little overlap, so it is for measuring, not training).
Each step also records `cpu`: the CPU time of the whole process (every thread) over the step, which
other processes' load on a shared machine changes much less than the wall time.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable

PHASES = ("data", "forward", "backward", "optimizer", "logging")


class StepProfile:
    """Per step: seconds in each phase and in the whole step (the rest is `other`)."""

    def __init__(self, synchronize: Callable[[], None] | None = None, skip: int = 0):
        self.synchronize = synchronize or (lambda: None)
        self.skip = skip  # warm-up steps left out of the summary
        self.steps: list[dict[str, float]] = []
        self._current: dict[str, float] | None = None
        self._started = 0.0
        self._cpu_started = 0.0

    @contextlib.contextmanager
    def phase(self, name: str):
        self.synchronize()
        started = time.perf_counter()
        try:
            yield
        finally:
            self.synchronize()
            if self._current is not None:
                self._current[name] = self._current.get(name, 0.0) + time.perf_counter() - started

    def begin_step(self) -> None:
        self.synchronize()
        self._current = dict.fromkeys(PHASES, 0.0)
        self._cpu_started = time.process_time()
        self._started = time.perf_counter()

    def end_step(self) -> None:
        self.synchronize()
        if self._current is None:
            return
        self._current["step"] = time.perf_counter() - self._started
        self._current["cpu"] = time.process_time() - self._cpu_started
        self._current["other"] = max(0.0, self._current["step"] - sum(self._current[p] for p in PHASES))
        self.steps.append(self._current)
        self._current = None

    def summary(self) -> dict[str, dict[str, float]]:
        """{phase: {median_ms, min_ms, mean_ms}} over the steps after the warm-up, `step` = the whole step."""
        kept = self.steps[self.skip:] or self.steps
        result = {}
        for name in (*PHASES, "other", "step", "cpu"):
            values = [step[name] * 1000 for step in kept]
            if values:
                result[name] = {"median_ms": round(statistics.median(values), 3), "min_ms": round(min(values), 3),
                                "mean_ms": round(statistics.fmean(values), 3)}
        result["steps"] = {"count": len(kept)}
        return result


def table(summaries: dict[str, dict], statistic: str = "median_ms") -> str:
    """Phases down, one column per run: `{label: StepProfile.summary()}`."""
    labels = list(summaries)
    width = max(12, *(len(label) + 2 for label in labels))
    lines = [f"{'ms/step (' + statistic.split('_')[0] + ')':<16}" + "".join(f"{label:>{width}}" for label in labels)]
    for name in (*PHASES, "other", "step", "cpu"):
        cells = []
        for label in labels:
            value = summaries[label].get(name, {}).get(statistic)
            cells.append(f"{value:>{width}.2f}" if value is not None else f"{'-':>{width}}")
        lines.append(f"{'cpu (process)' if name == 'cpu' else name:<16}" + "".join(cells))
    return "\n".join(lines)


class _NoProfile:
    """The default: no timing, no synchronization."""

    _null = contextlib.nullcontext()

    def phase(self, name: str):
        return self._null

    def begin_step(self) -> None:
        pass

    def end_step(self) -> None:
        pass


NO_PROFILE = _NoProfile()
