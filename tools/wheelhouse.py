"""`make dist`: a wheelhouse that installs envmgr on a server that reaches no index.

    python tools/wheelhouse.py DIR [--constraints FILE] [--platform TAG ... --python-version X.Y]

DIR gets envmgr's wheel, every dependency's wheel (and pip's, for pipx), and requirements.txt naming each of them
with its sha256, so that

    pip install --no-index --find-links DIR -r DIR/requirements.txt

installs exactly these files (pip checks the hashes). Without --platform the wheels are for this machine;
with it, the dependencies are the binary wheels for those platform tags and Python (name every tag the servers
accept: pip does not take manylinux_2_17 wheels for manylinux_2_28, e.g. --platform manylinux_2_28_x86_64
--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64).
Indexes, proxies and CA bundle: the host's own pip configuration.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from packaging.utils import parse_wheel_filename

ROOT = Path(__file__).resolve().parent.parent


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def build(out: Path, constraints: Path | None, platforms: list[str], python_version: str | None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("*.whl"), *out.glob("*.tar.gz")]:
        old.unlink()
    pinned = ["-c", str(constraints)] if constraints else []
    _pip("wheel", "-q", "--no-deps", "--wheel-dir", str(out), str(ROOT))
    own = next(out.glob("envmgr-*.whl"))
    if platforms:
        _pip("download", "-q", "--only-binary=:all:", *(a for p in platforms for a in ("--platform", p)),
             *(["--python-version", python_version] if python_version else []),
             "--dest", str(out), *pinned, str(own))
    else:
        _pip("wheel", "-q", "--wheel-dir", str(out), *pinned, str(own))
    # pip itself: `pipx install` upgrades the pip of its shared venv from the same --find-links
    _pip("download", "-q", "--no-deps", "--only-binary=:all:", "--dest", str(out), f"pip=={_pip_version()}")
    return write_requirements(out)


def _pip_version() -> str:
    from importlib.metadata import version

    return version("pip")


def write_requirements(out: Path) -> Path:
    """requirements.txt: `name==version --hash=sha256:...` for every wheel in `out` (pip requires them all)."""
    hashes: dict[tuple[str, str], list[str]] = defaultdict(list)
    for wheel in sorted(out.glob("*.whl")):
        name, version, _build, _tags = parse_wheel_filename(wheel.name)
        hashes[(name, str(version))].append(hashlib.sha256(wheel.read_bytes()).hexdigest())
    lines = ["# envmgr's wheelhouse: pip install --no-index --find-links . -r requirements.txt"]
    for (name, version), digests in sorted(hashes.items()):
        lines.append(f"{name}=={version} " + " ".join(f"--hash=sha256:{d}" for d in sorted(set(digests))))
    path = out / "requirements.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--constraints", type=Path, help="pins for the dependencies (e.g. a tested venv's freeze)")
    parser.add_argument("--platform", action="append", default=[], help="a wheel platform tag the target servers "
                        "accept (repeat it for each)")
    parser.add_argument("--python-version", help="the target servers' Python (with --platform), e.g. 3.11")
    args = parser.parse_args()
    path = build(args.out, args.constraints, args.platform, args.python_version)
    wheels = len(list(args.out.glob("*.whl")))
    print(f"{args.out}: {wheels} wheels, {path.name} with their sha256")


if __name__ == "__main__":
    main()
