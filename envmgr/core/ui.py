"""Output for people and machines: rich displays on a terminal, plain lines otherwise, JSON events
with `--json`. Every line passes through `redact`, so a mirror credential never reaches a log.

stdout is data, stderr is talk: steps, progress, warnings, status lines and errors go to stderr
(`err`); stdout carries only a verb's result: its table or record (`console`, written by cli.py),
the JSON events of `--json`, or the bytes of an SBOM. A verb whose result is raw bytes on stdout
calls `data_on_stdout()` first, so that even its `--json` events go to stderr.

A long step shows itself: a bar on a terminal; in plain mode (no terminal) a heartbeat line at least
every `HEARTBEAT_S` seconds, with the bytes or items done, the rate and the time so far."""

from __future__ import annotations

import contextlib
import json
import sys
import threading
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

HEARTBEAT_S = 10.0   # the longest a plain display stays silent during a progress step


class Reporter:
    heartbeat_s = HEARTBEAT_S

    def __init__(self, mode: str | None = None, secrets: list[str] | None = None, verbose: bool = False):
        self.console = Console(stderr=False, highlight=False, soft_wrap=True)   # the verb's result (stdout)
        self.err = Console(stderr=True, highlight=False, soft_wrap=True)        # everything said on the way
        if mode is None:
            mode = "rich" if self.err.is_terminal else "plain"
        self.mode = mode
        self.verbose = verbose
        self.secrets = sorted({s for s in (secrets or []) if s}, key=len, reverse=True)
        self._events_to_stderr = False

    def data_on_stdout(self) -> None:
        """The verb writes its result's bytes to stdout (an SBOM): `--json` events go to stderr."""
        self._events_to_stderr = True

    def _say(self, text: str) -> None:
        """A plain line of talk, on stderr."""
        sys.stderr.write(text + "\n")
        sys.stderr.flush()

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
            stream = sys.stderr if self._events_to_stderr else sys.stdout
            stream.write(self.redact(json.dumps(payload, default=str)) + "\n")
            stream.flush()

    def step(self, message: str, **fields: Any) -> None:
        if self.mode == "json":
            self.event("step", message=message, **fields)
        elif self.mode == "rich":
            self.err.print(f"[bold cyan]▸[/] {escape(self.redact(message))}")
        else:
            self._say(f"envmgr: {self.redact(message)}")

    def info(self, message: str) -> None:
        if self.mode == "json":
            self.event("info", message=message)
        elif self.mode == "rich":
            self.err.print(f"  {self.redact(message)}", markup=False)
        else:
            self._say(f"  {self.redact(message)}")

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
            self.err.print(f"[bold green]✓[/] {escape(self.redact(message))}")
        else:
            self._say(f"envmgr: {self.redact(message)}")

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
        """A progress bar (rich), a start line, a heartbeat every `heartbeat_s` and an end line (plain), or
        events (json); all but the json events on stderr."""
        started = time.monotonic()
        if self.mode == "rich":
            columns: list = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn()]
            columns += [DownloadColumn(), TransferSpeedColumn()] if unit == "bytes" else [MofNCompleteColumn()]
            columns += [TimeElapsedColumn(), TimeRemainingColumn()]
            with Progress(*columns, console=self.err, transient=False) as bar:
                task_id = bar.add_task(escape(self.redact(description)), total=total)
                yield Task(lambda n: bar.advance(task_id, n), lambda t: bar.update(task_id, total=t),
                           lambda d: bar.update(task_id, description=escape(self.redact(d))))
        else:
            self.step(description) if self.mode == "plain" else self.event("progress-start", task=description,
                                                                           total=total, unit=unit)
            done = [0.0]
            totals = [total]
            said = [description]

            def advance(n: float) -> None:
                done[0] += n

            def set_total(t: float | None) -> None:
                totals[0] = t

            def describe(d: str) -> None:
                said[0] = d

            stop = threading.Event()
            beat = None
            if self.mode == "plain":
                beat = threading.Thread(target=self._heartbeat, args=(stop, said, started, done, totals, unit),
                                        name="envmgr-heartbeat", daemon=True)
                beat.start()
            try:
                yield Task(advance, set_total, describe)
            finally:
                stop.set()
                if beat is not None:
                    beat.join()
            elapsed = time.monotonic() - started
            if self.mode == "plain":
                self._say(f"  done in {elapsed:.1f} s ({_amount(done[0], unit)})")
            else:
                self.event("progress-end", task=description, amount=done[0], unit=unit, seconds=round(elapsed, 3))

    def _heartbeat(self, stop: threading.Event, said: list[str], started: float, done: list[float],
                   totals: list[float | None], unit: str) -> None:
        """Plain mode: a line every `heartbeat_s` until the step ends (what is done, of what, how fast)."""
        while not stop.wait(self.heartbeat_s):
            self._say(self.redact(heartbeat_line(said[0], done[0], totals[0], unit, time.monotonic() - started)))


def _amount(amount: float, unit: str) -> str:
    return f"{amount / 1e6:.1f} MB" if unit == "bytes" else f"{int(amount)} {unit}"


def heartbeat_line(description: str, done: float, total: float | None, unit: str, elapsed: float) -> str:
    """`  … reading 46 layer(s) back…: 1200.0 MB of 5400.0 MB, 42.1 MB/s, 30 s so far` (the parts known)."""
    what = description if len(description) <= 48 else description[:47] + "…"
    parts = []
    if done or total:
        if unit == "bytes":
            parts.append(_amount(done, unit) + (f" of {_amount(total, unit)}" if total else ""))
        else:
            parts.append(f"{int(done)}" + (f" of {int(total)}" if total else "") + f" {unit}")
        if elapsed > 0 and done:
            parts.append(f"{done / 1e6 / elapsed:.1f} MB/s" if unit == "bytes" else f"{done / elapsed:.2f} {unit}/s")
    parts.append(f"{elapsed:.0f} s so far")
    return f"  … {what}: " + ", ".join(parts)


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
                                    console=self.ui.err, transient=True)
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
                                     TextColumn("ETA"), TimeRemainingColumn(), console=self.ui.err)
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
