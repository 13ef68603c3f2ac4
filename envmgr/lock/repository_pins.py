"""A pip repository's own exact pins (`requirements-lock.txt`, `constraints.txt`, …): the seed of its lock.

Many pip repositories ship what their authors tested beside a loose `requirements.txt`. envmgr hands
those pins to `uv pip compile` as the versions already in its output file, which uv keeps wherever the
adapted requirements allow (a preference, not a constraint: a pin the adaptation forbids just moves).
Only `name==version` lines go into the seed: never an index, a hash or a URL of the repository's file.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from envmgr.core.errors import UsageError
from envmgr.core.spec import Adaptations
from envmgr.lock.adapt import strip_local

# what a repository calls its pins, most specific first; `requirements.txt` counts when every line is `==`
PINS_FILES = ("requirements-lock.txt", "requirements.lock", "requirements.lock.txt", "requirements-frozen.txt",
              "requirements-freeze.txt", "constraints.txt")
REQUIREMENTS = "requirements.txt"
SEED_RECORD = "# envmgr seed: "    # the lock's line naming the pins file it started from, with its digest

_OPTION = re.compile(r"^(-i|--index-url|--extra-index-url|-f|--find-links)[\s=]+(\S+)")


@dataclass(frozen=True)
class Pin:
    name: str          # canonical
    version: str
    marker: str = ""   # `python_version < "3.12"`: the repository pins a name once per marker


@dataclass(frozen=True)
class RepositoryPins:
    path: Path
    relative: str                 # as the repository names it, for messages and the lock's record
    pins: tuple[Pin, ...]
    indexes: tuple[str, ...]      # --index-url / --extra-index-url / --find-links URLs it declares

    def versions(self) -> dict[str, str]:
        """name -> version (one name pinned once per marker: its versions joined with ', ')."""
        found: dict[str, list[str]] = {}
        for pin in self.pins:
            if pin.version not in found.setdefault(pin.name, []):
                found[pin.name].append(pin.version)
        return {name: ", ".join(versions) for name, versions in found.items()}

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.path.read_bytes()).hexdigest()

    @property
    def record(self) -> str:
        return f"{SEED_RECORD}{self.relative} {self.digest}"


def _logical(text: str) -> list[str]:
    return text.replace("\\\n", " ").splitlines()


def read_pins(path: Path, relative: str) -> RepositoryPins:
    """The exact pins of a requirements-style file (hashes, comments, options and ranges left out)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read the repository's pins: {exc}") from None
    pins: list[Pin] = []
    indexes: list[str] = []
    for line in _logical(text):
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        option = _OPTION.match(line)
        if option:
            indexes.append(option.group(2))
            continue
        if not line or line.startswith("-"):
            continue
        line = re.sub(r"\s--hash[=\s]\S+", "", line).strip()
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue          # an editable, a URL or a path: nothing an index pins
        specifiers = list(req.specifier)
        if req.url or len(specifiers) != 1 or specifiers[0].operator not in ("==", "===") \
                or "*" in specifiers[0].version:
            continue
        pins.append(Pin(canonicalize_name(req.name), specifiers[0].version, str(req.marker or "")))
    return RepositoryPins(path, relative, tuple(pins), tuple(indexes))


def _all_exact(path: Path) -> bool:
    """A requirements file in which every requirement is an exact pin (a `pip freeze`)."""
    requirements = 0
    for line in _logical(path.read_text(encoding="utf-8", errors="replace")):
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        if not line or line.startswith("-"):
            continue
        requirements += 1
        line = re.sub(r"\s--hash[=\s]\S+", "", line).strip()
        try:
            specifiers = list(Requirement(line).specifier)
        except InvalidRequirement:
            return False
        if len(specifiers) != 1 or specifiers[0].operator not in ("==", "===") or "*" in specifiers[0].version:
            return False
    return requirements > 0


def _inside(path: Path, source: Path) -> bool:
    """A third-party repository's link must not make envmgr read a file of the host."""
    return source.resolve() in path.resolve().parents


def find_pins(source: Path, adapt: Adaptations, where: Path, detect: bool = True) -> RepositoryPins | None:
    """The repository's pins: the file `[adapt] repository_pins` names (false: none), else the first of the
    common names in `source`, else `requirements.txt` when it is itself all `==` pins; None without one."""
    named = adapt.repository_pins
    if named is False:
        return None
    if isinstance(named, str):
        path = source / named
        if not _inside(path, source):
            raise UsageError(f"{where}: key 'adapt.repository_pins': {named!r} leads out of the repository")
        if not path.is_file():
            raise UsageError(f"{where}: key 'adapt.repository_pins': {named!r} is not a file of the method "
                             f"(looked in {source})",
                             hint="name the repository's pins file, or set repository_pins = false")
        return read_pins(path, named)
    if not detect:
        return None
    for name in (*PINS_FILES, REQUIREMENTS):
        path = source / name
        if path.is_file() and _inside(path, source) and (name != REQUIREMENTS or _all_exact(path)):
            found = read_pins(path, name)
            if found.pins:
                return found
    return None


def seed_requirements(pins: RepositoryPins, adapt: Adaptations, strip_labels: bool) -> str:
    """What goes into uv's output file before it compiles: the repository's pins the adaptation leaves alone.

    Pinned and dropped packages leave the seed (the adaptation decides them); with `strip_labels` (no index of
    the repository reaches the site but through the default one) `2.5.1+cu124` is kept as `2.5.1`, the release
    the default index has.
    """
    removed = {canonicalize_name(n) for n in [*adapt.pin, *adapt.drop]}
    lines = []
    for pin in pins.pins:
        if pin.name in removed:
            continue
        version = strip_local(pin.version) if strip_labels else pin.version
        lines.append(f"{pin.name}=={version}" + (f" ; {pin.marker}" if pin.marker else ""))
    return "\n".join(lines) + "\n"


def as_lock(pins: list[tuple[str, str]]) -> dict:
    """name/version pairs in the shape `adapt.lock_drift` compares (a poetry.lock's `package` list)."""
    return {"package": [{"name": name, "version": version} for name, version in pins]}


def lock_pins(text: str) -> list[tuple[str, str]]:
    """name/version of each `name==version` of a hashed requirements lock (envmgr's own)."""
    return [(canonicalize_name(name), version)
            for name, version in re.findall(r"^([A-Za-z0-9][A-Za-z0-9_.\-]*)(?:\[[^\]]*\])?==(\S+)", text, re.M)]


def recorded_seed(lock_text: str) -> str | None:
    """`requirements-lock.txt sha256:…`: the pins file (and its digest) a lock started from, None if none."""
    for line in lock_text.splitlines()[:3]:
        if line.startswith(SEED_RECORD):
            return line[len(SEED_RECORD):].strip()
    return None
