"""Output for people and machines: rich displays on a terminal, plain lines otherwise, JSON events
with `--json`. Every line passes through `redact`, so a mirror credential never reaches a log."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)


class Reporter:
    def __init__(self, mode: str | None = None, secrets: list[str] | None = None, verbose: bool = False):
        self.console = Console(stderr=False, highlight=False, soft_wrap=True)
        self.err = Console(stderr=True, highlight=False, soft_wrap=True)
        if mode is None:
            mode = "rich" if self.console.is_terminal else "plain"
        self.mode = mode
        self.verbose = verbose
        self.secrets = sorted({s for s in (secrets or []) if s}, key=len, reverse=True)

    def add_secrets(self, secrets: list[str]) -> None:
        self.secrets = sorted({*self.secrets, *(s for s in secrets if s)}, key=len, reverse=True)

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text

    # ------------------------------------------------------------------ lines

    def event(self, kind: str, **fields: Any) -> None:
        """A machine-readable event (JSON mode only)."""
        if self.mode == "json":
            payload = {"event": kind, **fields}
            sys.stdout.write(self.redact(json.dumps(payload, default=str)) + "\n")
            sys.stdout.flush()

    def step(self, message: str, **fields: Any) -> None:
        if self.mode == "json":
            self.event("step", message=message, **fields)
        elif self.mode == "rich":
            self.console.print(f"[bold cyan]▸[/] {escape(self.redact(message))}")
        else:
            print(f"envmgr: {self.redact(message)}", flush=True)

    def info(self, message: str) -> None:
        if self.mode == "json":
            self.event("info", message=message)
        elif self.mode == "rich":
            self.console.print(f"  {self.redact(message)}", markup=False)
        else:
            print(f"  {self.redact(message)}", flush=True)

    def log(self, line: str) -> None:
        """A line of a subprocess's output: shown with -v, always redacted."""
        if self.verbose:
            if self.mode == "json":
                self.event("log", line=line)
            else:
                self.err.print(f"  │ {self.redact(line)}", markup=False, style="dim")

    def warn(self, message: str) -> None:
        if self.mode == "json":
            self.event("warning", message=message)
        else:
            self.err.print(f"[yellow]warning:[/] {escape(self.redact(message))}")

    def success(self, message: str, **fields: Any) -> None:
        if self.mode == "json":
            self.event("done", message=message, **fields)
        elif self.mode == "rich":
            self.console.print(f"[bold green]✓[/] {escape(self.redact(message))}")
        else:
            print(f"envmgr: {self.redact(message)}", flush=True)

    def error(self, message: str, hint: str | None = None, label: str = "error") -> None:
        """One line that says what failed (and a hint); `label` is "interrupted" for Ctrl-C / SIGTERM."""
        if self.mode == "json":
            self.event(label, message=message, hint=hint)
        else:
            colour = "yellow" if label == "interrupted" else "red"
            self.err.print(f"[bold {colour}]{label}:[/] {escape(self.redact(message))}")
            if hint:
                self.err.print(f"  [dim]{escape(self.redact(hint))}[/]")

    # ------------------------------------------------------------------ progress

    @contextlib.contextmanager
    def progress(self, description: str, total: float | None = None, unit: str = "items") -> Iterator["Task"]:
        """A progress bar (rich), a start and end line (plain), or events (json)."""
        started = time.monotonic()
        if self.mode == "rich":
            columns: list = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn()]
            columns += [DownloadColumn(), TransferSpeedColumn()] if unit == "bytes" else [MofNCompleteColumn()]
            columns += [TimeElapsedColumn(), TimeRemainingColumn()]
            with Progress(*columns, console=self.console, transient=False) as bar:
                task_id = bar.add_task(escape(self.redact(description)), total=total)
                yield Task(lambda n: bar.advance(task_id, n), lambda t: bar.update(task_id, total=t),
                           lambda d: bar.update(task_id, description=escape(self.redact(d))))
        else:
            self.step(description) if self.mode == "plain" else self.event("progress-start", task=description,
                                                                           total=total, unit=unit)
            done = [0.0]

            def advance(n: float) -> None:
                done[0] += n

            yield Task(advance, lambda t: None, lambda d: None)
            elapsed = time.monotonic() - started
            if self.mode == "plain":
                amount = f"{done[0] / 1e6:.1f} MB" if unit == "bytes" else f"{int(done[0])} {unit}"
                print(f"  done in {elapsed:.1f} s ({amount})", flush=True)
            else:
                self.event("progress-end", task=description, amount=done[0], unit=unit, seconds=round(elapsed, 3))


class Task:
    def __init__(self, advance, set_total, describe):
        self.advance = advance
        self.set_total = set_total
        self.describe = describe


def latest_segment(line: str, width: int = 160) -> str:
    """What a terminal shows of a line redrawn with carriage returns (tqdm): its last non-empty
    segment, control characters dropped, cut to `width`."""
    segments = [s for s in line.split("\r") if s.strip()]
    text = "".join(c for c in (segments[-1] if segments else "") if c.isprintable()).strip()
    return text if len(text) <= width else text[:width - 1] + "…"


class TrainingProgress:
    """A method's `{"event": "progress", ...}` lines as a bar on a terminal, every tenth step in plain mode.

    A method that prints no such events (most third-party ones) shows its newest output line instead,
    tqdm bars included, on a terminal; plain and JSON modes leave that to `-v` and log.txt."""

    def __init__(self, ui: Reporter):
        self.ui = ui
        self._bar: Progress | None = None
        self._task: Any = None
        self._status: Progress | None = None
        self._status_task: Any = None

    def line(self, text: str) -> None:
        """A line (or the part of one being redrawn) the method printed: the newest one is shown."""
        if self.ui.mode != "rich" or self._bar is not None:
            return
        shown = escape(self.ui.redact(latest_segment(text)))
        if not shown:
            return
        if self._status is None:
            self._status = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                                    console=self.ui.console, transient=True)
            self._status.__enter__()
            self._status_task = self._status.add_task(shown, total=None)
        self._status.update(self._status_task, description=shown)

    def _close_status(self) -> None:
        if self._status is not None:
            self._status.__exit__(None, None, None)
            self._status = None

    def update(self, event: dict[str, Any]) -> None:
        step, total = event.get("step", 0), event.get("max_steps")
        loss, sps = event.get("loss", float("nan")), event.get("s_per_step", 0)
        if self.ui.mode == "rich":
            if self._bar is None:
                self._close_status()   # the method speaks JSON progress: the bar replaces its last line
                self._bar = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[sps]} s/step"),
                                     TextColumn("ETA"), TimeRemainingColumn(), console=self.ui.console)
                self._bar.__enter__()
                self._task = self._bar.add_task("training", total=total, loss="-", sps="-")
            self._bar.update(self._task, completed=step, loss=f"{loss:.4f}", sps=f"{sps:.2f}")
        elif self.ui.mode == "plain":
            if step == 1 or step == total or (total and step % max(1, total // 10) == 0):
                self.ui.info(f"step {step}/{total} loss {loss:.4f} {sps:.2f} s/step")

    def close(self) -> None:
        self._close_status()
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None
