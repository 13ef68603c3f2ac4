"""Reading what envmgr said on stderr, now that its talk (steps, progress, heartbeats) is there too."""

from __future__ import annotations


def error_lines(stderr: str) -> list[str]:
    """The non-empty lines from envmgr's first `error:` or `interrupted:` line on: what it said went wrong
    (the one line and its hint), without the progress talk before it. No such line: every non-empty line."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    for index, line in enumerate(lines):
        if line.startswith(("error:", "interrupted:")):
            return lines[index:]
    return lines
