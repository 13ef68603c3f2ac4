"""Choosing, from a poetry.lock, the packages a target installs — without poetry.

A lock can hold two versions of one package under overlapping markers (torch's CUDA extras pin
one nvidia-cublas, cudnn accepts any). Poetry settles that at install time by walking the
dependency graph; this does the same walk: from the project's dependencies, through each locked
package's dependencies whose markers hold for the target (extras included), keeping for each
name the highest locked version that satisfies every constraint met on the way.
"""

from __future__ import annotations

import re
import tomllib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from envmgr.core.errors import StaleLockError


def file_hashes(path: Path) -> dict[str, list[str]]:
    """Normalized name -> sha256 of every file a poetry.lock allows for it ({}: no lock at `path`)."""
    if not path.is_file():
        return {}
    data = tomllib.loads(path.read_text())
    found: dict[str, list[str]] = {}
    for package in data.get("package", []):
        hashes = [f["hash"].removeprefix("sha256:") for f in package.get("files", [])
                  if str(f.get("hash", "")).startswith("sha256:")]
        found[canonicalize_name(package["name"])] = hashes
    return found


@dataclass
class Need:
    name: str
    constraint: str = "*"
    extras: set[str] = field(default_factory=set)
    marker: str | None = None


def _caret(version: str) -> str:
    parts = [int(p) for p in re.findall(r"\d+", version)[:3]] + [0, 0]
    major, minor, patch = parts[:3]
    count = len(re.findall(r"\d+", version))
    if major:
        upper = f"{major + 1}.0.0"
    elif minor or count < 3:
        upper = f"0.{minor + 1}.0" if count >= 2 else "1.0.0"
    else:
        upper = f"0.0.{patch + 1}"
    return f">={version},<{upper}"


def _tilde(version: str) -> str:
    numbers = re.findall(r"\d+", version)
    if len(numbers) >= 2:
        upper = f"{numbers[0]}.{int(numbers[1]) + 1}.0"
    else:
        upper = f"{int(numbers[0]) + 1}.0.0"
    return f">={version},<{upper}"


def satisfies(version: str, constraint: str) -> bool:
    """Poetry constraint syntax (`*`, `^1.2`, `~1.2`, `1.2.3`, `a || b`, PEP 440) against a version."""
    constraint = (constraint or "*").strip()
    if "||" in constraint:
        return any(satisfies(version, part) for part in constraint.split("||"))
    try:
        parsed = Version(version)
    except InvalidVersion:
        return True
    pieces = []
    for part in re.split(r",\s*|\s+(?=[<>=!~^])", constraint):
        part = part.strip()
        if not part or part == "*":
            continue
        if part.startswith("^"):
            part = _caret(part[1:].strip())
        elif part.startswith("~") and not part.startswith("~="):
            part = _tilde(part[1:].strip())
        elif re.match(r"^\d", part):
            part = f"=={part}"
        pieces.append(part)
    if not pieces:
        return True
    try:
        return SpecifierSet(",".join(pieces)).contains(parsed, prereleases=True)
    except InvalidSpecifier:
        return True


def _dependency_needs(name: str, value) -> list[Need]:
    entries = value if isinstance(value, list) else [value]
    needs = []
    for entry in entries:
        if isinstance(entry, str):
            needs.append(Need(name, entry))
        else:
            # poetry also records a `python` range per dependency; the lock's own markers already carry it
            needs.append(Need(name, entry.get("version", "*"), set(entry.get("extras", [])), entry.get("markers")))
    return needs


def root_needs(pyproject: dict) -> list[Need]:
    needs = []
    for text in pyproject.get("project", {}).get("dependencies", []):
        try:
            req = Requirement(text)
        except InvalidRequirement:
            continue
        needs.append(Need(req.name, str(req.specifier) or "*", set(req.extras),
                          str(req.marker) if req.marker else None))
    for name, value in pyproject.get("tool", {}).get("poetry", {}).get("dependencies", {}).items():
        if name.lower() != "python":
            needs.extend(_dependency_needs(name, value))
    return needs


def _active(marker: str | None, environment: dict[str, str], extras: set[str]) -> bool:
    if not marker:
        return True
    parsed = Marker(marker)
    if "extra" not in marker:
        return parsed.evaluate(environment)
    return any(parsed.evaluate({**environment, "extra": extra}) for extra in (extras or {""}))


def select(lock: dict, pyproject: dict, environment: dict[str, str], lock_path: str = "poetry.lock") -> list[dict]:
    by_name: dict[str, list[dict]] = defaultdict(list)
    for package in lock.get("package", []):
        if "main" in package.get("groups", ["main"]):
            by_name[canonicalize_name(package["name"])].append(package)
    constraints: dict[str, set[str]] = defaultdict(set)
    extras: dict[str, set[str]] = defaultdict(set)
    chosen: dict[str, dict] = {}
    pending: list[tuple[Need, set[str]]] = [(need, set()) for need in root_needs(pyproject)]
    seen: set[tuple] = set()
    while pending:
        need, parent_extras = pending.pop()
        key = canonicalize_name(need.name)
        token = (key, need.constraint, tuple(sorted(need.extras)), need.marker, tuple(sorted(parent_extras)))
        if token in seen:
            continue
        seen.add(token)
        if not _active(need.marker, environment, parent_extras):
            continue
        constraints[key].add(need.constraint)
        extras[key] |= need.extras
        candidates = [p for p in by_name.get(key, [])
                      if all(satisfies(p["version"], c) for c in constraints[key])]
        if not candidates:
            raise StaleLockError(f"{lock_path}: no locked version of {need.name} satisfies "
                                 f"{' and '.join(sorted(constraints[key]))}", hint="re-run `envmgr lock`")
        best = max(candidates, key=lambda p: Version(p["version"]))
        chosen[key] = best
        for dep_name, value in best.get("dependencies", {}).items():
            for dep in _dependency_needs(dep_name, value):
                pending.append((dep, set(extras[key])))
    return [chosen[name] for name in sorted(chosen)]
