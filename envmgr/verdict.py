"""An honest verdict: a method that exits 0 succeeded only if it wrote what its spec says it writes.

Launchers that always exit 0 (a shell script ending in `echo done`) are common; the spec's
`success = ["output/*.safetensors"]` names globs, relative to the run directory, that must each
match a file this attempt wrote. A folder matched counts when a file under it was written.
"""

from __future__ import annotations

from pathlib import Path

from .spec import MethodSpec

# Filesystem timestamps come from a coarse kernel clock: a file written just after the container
# started may carry a time a little before the moment envmgr read from its own clock.
CLOCK_SLACK_NS = 1_000_000_000


def _written_since(path: Path, since_ns: int) -> bool:
    if path.is_symlink():
        return False
    if path.is_file():
        return path.stat().st_mtime_ns >= since_ns
    if path.is_dir():
        return any(_written_since(child, since_ns) for child in path.rglob("*") if child.is_file())
    return False


def missing_outputs(spec: MethodSpec, run_dir: Path, started_ns: int) -> list[str]:
    """The spec's success globs that no file written since `started_ns` matches (empty: a success)."""
    since = started_ns - CLOCK_SLACK_NS
    missing = []
    for pattern in spec.success or []:
        if not any(_written_since(match, since) for match in run_dir.glob(pattern)):
            missing.append(pattern)
    return missing
