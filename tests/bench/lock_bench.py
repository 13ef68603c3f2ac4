"""Benchmark: locking a one-pin change of a real poetry project, `envmgr lock` against `poetry lock` on the host
(issue 26). Prints a table and writes bench-results/lock.json.

sd-demo (82 locked packages, torch's CUDA stack included) is copied as an added method; each round changes
one pin of its pyproject.toml (accelerate, to another released version) and locks it starting from sd-demo's
committed lock, twice side by side:
  - `envmgr lock` (poetry in a container of the method's base image, through the site's mirror), and
  - `poetry lock` on the host: the same poetry and PyPI-mirror plugin versions in a venv installed with the
    host's pip (kept in ENVMGR_TEST_STORE), the same mirror, the same pyproject.toml and previous lock.
Cold: both poetry caches empty (the first round); warm: the caches kept (the minimum of the later rounds).
Where the time goes, from poetry's own lines as they arrive: start-up (envmgr and the container, or poetry's
start) up to "Resolving dependencies...", resolving up to "Writing lock file", and the rest (writing, and for
envmgr its checks of the lock). Goal: envmgr's warm lock no slower than the host's.
Both sides run with their bytecode: envmgr's modules are compiled first, as installing envmgr compiles them
(the host's poetry was installed with pip, which compiled it).
Run: `.venv/bin/python -m tests.bench.lock_bench [--rounds N]` (part of `make bench`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "bench-results"
STORE = Path(os.environ.get("ENVMGR_TEST_STORE", "/var/tmp/envmgr-test-store"))
NAME = "lockpin"
PACKAGE = "accelerate"
PINNED = re.compile(r'"accelerate==([^"]+)"')
OTHER_VERSIONS = ("1.14.0", "1.13.0", "1.12.0", "1.11.0")   # released versions besides sd-demo's pin
RESOLVING, WRITING = "Resolving dependencies", "Writing lock file"


def timed_lines(command: list[str], env: dict[str, str], cwd: Path, line_of) -> tuple[float, dict[str, float]]:
    """Run `command`; its wall time and when (seconds from its start) each of poetry's phase lines arrived."""
    started = time.monotonic()
    marks: dict[str, float] = {}
    proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    said: list[str] = []
    assert proc.stdout is not None
    for raw in proc.stdout:
        said.append(raw)
        line = line_of(raw)
        for mark in (RESOLVING, WRITING):
            if line is not None and mark in line and mark not in marks:
                marks[mark] = time.monotonic() - started
    if proc.wait() != 0:
        raise RuntimeError(f"{' '.join(command[:4])} failed:\n{''.join(said[-30:])}")
    return time.monotonic() - started, marks


def envmgr_line(raw: str) -> str | None:
    """A line of the lock step's output, from `envmgr --json -v`'s log events."""
    if not raw.startswith("{"):
        return None
    event = json.loads(raw)
    return event.get("line") if event.get("event") == "log" else None


def phases(wall: float, marks: dict[str, float]) -> dict[str, float]:
    resolving, writing = marks.get(RESOLVING, 0.0), marks.get(WRITING, wall)
    return {"start_s": round(resolving, 2), "resolve_s": round(writing - resolving, 2),
            "write_and_check_s": round(wall - writing, 2)}


def host_poetry() -> Path:
    """poetry and the mirror plugin at envmgr's versions in a venv on the host (installed with the host's pip)."""
    from envmgr.lock.backends.poetry import POETRY_VERSION, PYPI_MIRROR_PLUGIN_VERSION

    venv = STORE / "host-tools" / f"poetry-{POETRY_VERSION}-mirror-{PYPI_MIRROR_PLUGIN_VERSION}"
    if not (venv / ".complete").exists():
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        proc = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", f"poetry=={POETRY_VERSION}",
                               f"poetry-plugin-pypi-mirror=={PYPI_MIRROR_PLUGIN_VERSION}"], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"installing poetry on the host failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
        (venv / ".complete").touch()
    return venv / "bin" / "poetry"


def installed_bytecode() -> int:
    """envmgr's own modules compiled, as installing envmgr compiles them (pip writes the .pyc files; so it did for
    the host's poetry): a checkout run with PYTHONDONTWRITEBYTECODE=1 otherwise compiles every envmgr module
    `envmgr lock` imports on each start (~0.3 s a lock measured here), which an installed envmgr never pays.
    The number of modules whose bytecode was missing or stale."""
    import compileall
    import importlib.util

    stale = sum(1 for source in (REPO / "envmgr").rglob("*.py")
                if not Path(importlib.util.cache_from_source(str(source))).is_file())
    if not compileall.compile_dir(REPO / "envmgr", quiet=1):
        raise RuntimeError("compiling envmgr's bytecode failed")
    return stale


def locked(path: Path) -> dict[str, str]:
    return {p["name"]: p["version"] for p in tomllib.loads(path.read_text()).get("package", [])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="rounds (the first is cold); default 4")
    args = parser.parse_args()
    from envmgr.core.config import load_config
    from envmgr.door.mirrors import on_host, poetry_env
    from tests.support.engine import ensure_engine

    ensure_engine()
    poetry = host_poetry()
    compiled = installed_bytecode()
    work = Path(tempfile.mkdtemp(prefix="envmgr-lock-bench-", dir="/var/tmp"))
    base_dir, cache = work / "base", work / "cache"
    method = base_dir / "methods" / NAME
    shutil.copytree(REPO / "envs" / "sd-demo", method, ignore=shutil.ignore_patterns(
        "variants", "bench", "tests", ".venv*", "__pycache__", "env-layers.json"))
    spec_file = method / "envmgr.toml"
    spec_text = re.sub(r'^name = "sd-demo"', f'name = "{NAME}"', spec_file.read_text(), count=1, flags=re.M)
    spec_file.write_text(spec_text.split("\n[variants.")[0])
    committed_lock = REPO / "envs" / "sd-demo" / "poetry.lock"
    pyproject = (method / "pyproject.toml").read_text()
    host_project = work / "host-project"
    host_project.mkdir()
    env = {**os.environ, "ENVMGR_BASE_DIR": str(base_dir), "ENVMGR_CACHE_DIR": str(cache),
           "ENVMGR_STORE_DIR": str(STORE), "ENVMGR_CONFIG": "/dev/null"}
    mirrors = load_config(files=[]).mirrors
    host_env = {**os.environ, **on_host(poetry_env(mirrors), mirrors), "POETRY_CACHE_DIR": str(work / "host-cache")}
    rounds: list[dict] = []
    try:
        for index in range(args.rounds):
            version = OTHER_VERSIONS[index % len(OTHER_VERSIONS)]
            changed = PINNED.sub(f'"{PACKAGE}=={version}"', pyproject, count=1)
            for folder in (method, host_project):          # the same manifest and previous lock for both
                (folder / "pyproject.toml").write_text(changed)
                shutil.copy2(committed_lock, folder / "poetry.lock")
            runs = {}
            order = ("envmgr", "host") if index % 2 == 0 else ("host", "envmgr")
            for who in order:
                if who == "envmgr":
                    wall, marks = timed_lines([sys.executable, "-m", "envmgr", "--json", "-v", "lock", NAME], env,
                                              REPO, envmgr_line)
                else:
                    wall, marks = timed_lines([str(poetry), "lock", "--no-ansi"], host_env, host_project,
                                              lambda raw: raw)
                runs[who] = {"wall_s": round(wall, 2), **phases(wall, marks)}
            ours, theirs = locked(method / "poetry.lock"), locked(host_project / "poetry.lock")
            if ours != theirs or ours.get(PACKAGE) != version:
                raise RuntimeError(f"round {index}: the two locks differ: "
                                   f"{sorted(set(ours.items()) ^ set(theirs.items()))[:6]}")
            rounds.append({"pin": f"{PACKAGE}=={version}", "cache": "cold" if index == 0 else "warm", **runs})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    warm = rounds[1:] or rounds
    best = {who: min(warm, key=lambda r, w=who: r[w]["wall_s"])[who] for who in ("envmgr", "host")}
    results = {
        "packages": len(locked(committed_lock)), "envmgr_modules_compiled_first": compiled,
        "cold_envmgr_lock_s": rounds[0]["envmgr"]["wall_s"], "cold_host_poetry_lock_s": rounds[0]["host"]["wall_s"],
        "warm_envmgr_lock_s": best["envmgr"]["wall_s"], "warm_host_poetry_lock_s": best["host"]["wall_s"],
        "warm_ratio": round(best["envmgr"]["wall_s"] / best["host"]["wall_s"], 2),
        "warm_envmgr_phases": best["envmgr"], "warm_host_phases": best["host"], "goal_ratio": 1.0,
        "met": best["envmgr"]["wall_s"] <= best["host"]["wall_s"], "rounds": rounds,
    }
    OUT.mkdir(exist_ok=True)
    (OUT / "lock.json").write_text(json.dumps(results, indent=1))
    print(f"{'one pin changed in sd-demo':<30} {'envmgr lock':>12} {'poetry lock (host)':>19}")
    for row in rounds:
        print(f"{row['pin'] + ' (' + row['cache'] + ')':<30} {row['envmgr']['wall_s']:>11.1f}s "
              f"{row['host']['wall_s']:>18.1f}s")
    for who in ("envmgr", "host"):
        print(f"  warm best, {who}: start {best[who]['start_s']} s, resolve {best[who]['resolve_s']} s, "
              f"write (+checks) {best[who]['write_and_check_s']} s")
    print(f"{'warm_ratio':>30}  {results['warm_ratio']}  (goal <= {results['goal_ratio']}; met: {results['met']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
