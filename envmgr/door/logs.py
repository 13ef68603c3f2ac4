"""A container's output as lines: linear in its input, every line capped.

A method can print anything, e.g. a 100 MB line from a huge caption. Lines are split as the bytes
arrive (each byte looked at once), and a line longer than `max_line` keeps its head and tail with
a note of how much was dropped, so envmgr's memory and time stay bounded whatever a method prints.
`uncaught_traceback` reads whether a process's lines end in the traceback of an exception nothing caught.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

MAX_LINE = 64 << 10      # bytes kept of one line: its first 3/4 and its last 1/4


class LineSplitter:
    def __init__(self, max_line: int = MAX_LINE):
        self.head_max = max_line * 3 // 4
        self.tail_max = max_line - self.head_max
        self._head = bytearray()
        self._tail = bytearray()
        self._dropped = 0

    def feed(self, chunk: bytes) -> Iterator[str]:
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            if end < 0:
                self._add(chunk, start, len(chunk))
                return
            self._add(chunk, start, end)
            yield self._take()
            start = end + 1

    def pending(self) -> str:
        """The newest carriage-return segment of the line not yet ended (a tqdm bar as it is now)."""
        text = (self._tail or self._head).decode("utf-8", errors="replace").rstrip("\r")
        return text.rsplit("\r", 1)[-1]

    def close(self) -> Iterator[str]:
        if self._head or self._tail or self._dropped:
            yield self._take()

    def _add(self, chunk: bytes, start: int, end: int) -> None:
        if start >= end:
            return
        room = self.head_max - len(self._head)
        if room > 0:
            take = min(room, end - start)
            self._head += chunk[start:start + take]
            start += take
            if start >= end:
                return
        size = end - start
        if size >= self.tail_max:
            self._dropped += len(self._tail) + size - self.tail_max
            self._tail = bytearray(chunk[end - self.tail_max:end])
            return
        self._tail += chunk[start:end]
        excess = len(self._tail) - self.tail_max
        if excess > 0:
            del self._tail[:excess]
            self._dropped += excess

    def _take(self) -> str:
        line = self._head.decode("utf-8", errors="replace")
        if self._dropped:
            line += f" [envmgr: {self._dropped} bytes of this line dropped] "
        line += self._tail.decode("utf-8", errors="replace")
        self._head, self._tail, self._dropped = bytearray(), bytearray(), 0
        return line.rstrip("\r")


def split_lines(chunks: Iterable[bytes], max_line: int = MAX_LINE) -> Iterator[str]:
    splitter = LineSplitter(max_line)
    for chunk in chunks:
        yield from splitter.feed(chunk)
    yield from splitter.close()


# how CPython prints an exception that ends a process (a step's script, a method)
_TRACEBACK = "Traceback (most recent call last):"
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(: .*)?$")
_NOT_THE_PROCESS = ("Exception ignored", "Exception in thread")   # printed, and the process goes on


def uncaught_traceback(lines: list[str]) -> str | None:
    """The exception line (`OSError: ...`) when `lines` end in an uncaught Python traceback, else None.

    The last `Traceback (most recent call last):` must be followed by its frames (`  File ...`), then one
    exception line, then nothing but blank lines. A prefix before the marker that every following line
    repeats (`[rank0]: `) is taken off; a traceback the interpreter prints and goes on from
    (`Exception ignored in ...`, `Exception in thread ...`) is not the process's end."""
    at = next((i for i in range(len(lines) - 1, -1, -1) if _TRACEBACK in lines[i]), None)
    if at is None:
        return None
    prefix = lines[at][:lines[at].index(_TRACEBACK)]
    rest = lines[at + 1:]
    if not prefix.strip() or not all(line.startswith(prefix) or not line.strip() for line in rest):
        prefix = ""
    rest = [line[len(prefix):] if prefix and line.startswith(prefix) else line for line in rest]
    before = lines[at - 1].removeprefix(prefix).strip() if at else ""
    if before.startswith(_NOT_THE_PROCESS):
        return None
    while rest and not rest[-1].strip():
        rest.pop()
    if len(rest) < 2 or not rest[0].lstrip().startswith("File "):
        return None
    frames, last = rest[:-1], rest[-1]
    if not _EXCEPTION_LINE.match(last) or not all(not line.strip() or line[:1].isspace() for line in frames):
        return None
    return last.strip()
