"""A container's output as lines: linear in its input, every line capped.

A method can print anything, e.g. a 100 MB line from a huge caption. Lines are split as the bytes
arrive (each byte looked at once), and a line longer than `max_line` keeps its head and tail with
a note of how much was dropped, so envmgr's memory and time stay bounded whatever a method prints.
"""

from __future__ import annotations

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
