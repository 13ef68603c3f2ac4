"""Real wheels from the host's own index, fetched with pip and served from 127.0.0.1.

pip runs on the host and inherits its configuration (index, mirrors, certificates): the tests never name
an index. The wheels are then served by tests.support.pypi.Index on the loopback, like built ones.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def download_wheels(dest: Path, requirements: list[str], *, deps: bool = False) -> list[Path]:
    """`pip download --only-binary :all:` of `requirements` into `dest` (with their dependencies when `deps`)."""
    dest.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
            "--only-binary", ":all:", "-d", str(dest), *([] if deps else ["--no-deps"]), *requirements]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"pip download {' '.join(requirements)} failed:\n{proc.stdout}\n{proc.stderr}")
    return sorted(dest.glob("*.whl"))
