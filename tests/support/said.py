"""Reading what envmgr said on stderr, now that its talk (steps, progress, heartbeats) is there too."""

from __future__ import annotations

from pathlib import Path


def error_lines(stderr: str) -> list[str]:
    """The non-empty lines from envmgr's first `error:` or `interrupted:` line on: what it said went wrong
    (the one line and its hint), without the progress talk before it. No such line: every non-empty line."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    for index, line in enumerate(lines):
        if line.startswith(("error:", "interrupted:")):
            return lines[index:]
    return lines


def run_dir_of(proc, runs: Path) -> Path:
    """The run dir of the run an `envmgr run` process made, by the run id it said (never the newest folder:
    two runs started in the same second sort by their random suffix)."""
    import re

    found = re.search(r"\brun (\d{8}-\d{6}-[0-9a-f]{4})\b", proc.stderr + proc.stdout)
    assert found, f"no run id in what envmgr said:\n{proc.stderr}"
    return runs / found.group(1)
