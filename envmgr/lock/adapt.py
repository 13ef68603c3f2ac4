"""Adapting a third-party method without forking it.

The method's own manifest (pyproject.toml or requirements.txt) stays byte-identical; envmgr
derives an *effective* manifest from it and the spec's `[adapt]` table (pin, drop, add, map an
index), and locks that. Before resolving, every dependency a site cannot reach (git, URL, local
path, an index no mirror maps) is listed in one message with the override that fixes it.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from urllib.parse import urlsplit

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from envmgr.core.errors import UsageError
from envmgr.core.spec import Adaptations

VCS_KEYS = ("git", "url", "path", "hg", "svn", "bzr")
SOURCE_KEYS = (*VCS_KEYS, "rev", "branch", "tag", "subdirectory", "develop", "resolved_reference")


class UnreachableSources(UsageError):
    """Dependencies the site cannot install from an index, each with its fix."""


def _name(text: str) -> str:
    return canonicalize_name(text)


# ---------------------------------------------------------------------- pyproject (poetry)


def _poetry_tables(data: dict) -> list[dict]:
    """Every [tool.poetry] dependency table: main and each group."""
    poetry = data.get("tool", {}).get("poetry", {})
    tables = [poetry.get("dependencies", {}), poetry.get("dev-dependencies", {})]
    for group in poetry.get("group", {}).values():
        tables.append(group.get("dependencies", {}))
    return [t for t in tables if isinstance(t, dict)]


def _pep508_lists(data: dict) -> list[list]:
    lists = [data.get("project", {}).get("dependencies", [])]
    lists += list(data.get("project", {}).get("optional-dependencies", {}).values())
    lists += [v for v in data.get("dependency-groups", {}).values() if isinstance(v, list)]
    return [lst for lst in lists if isinstance(lst, list)]


def pyproject_names(data: dict) -> set[str]:
    names = {_name(n) for table in _poetry_tables(data) for n in table if n.lower() != "python"}
    for lst in _pep508_lists(data):
        for text in lst:
            if isinstance(text, str):
                try:
                    names.add(_name(Requirement(text).name))
                except InvalidRequirement:
                    continue
    return names


def _declared_sources(data: dict) -> list[dict]:
    return list(data.get("tool", {}).get("poetry", {}).get("source", []))


def unreachable_in_pyproject(data: dict, adapt: Adaptations, site_sources: dict[str, str],
                             locked: dict[str, str] | None = None) -> list[str]:
    """Each dependency the site cannot fetch, with its fix; `locked` (name -> version from the repository's
    own lock) turns the proposed pins into the versions its authors used."""
    locked = {_name(n): v for n, v in (locked or {}).items()}
    problems = []
    pinned = {_name(n) for n in adapt.pin} | {_name(n) for n in adapt.drop}
    for table in _poetry_tables(data):
        for name, value in table.items():
            entries = value if isinstance(value, list) else [value]
            for entry in entries:
                if isinstance(entry, dict) and _name(name) not in pinned:
                    kind = next((k for k in VCS_KEYS if k in entry), None)
                    if kind:
                        problems.append(f"{name} comes from {kind} {entry[kind]} → [adapt] "
                                        f"{proposed_pin(name, locked)} "
                                        f"(or drop = [\"{name}\"])")
    for lst in _pep508_lists(data):
        for text in lst:
            try:
                req = Requirement(text)
            except InvalidRequirement:
                continue
            if req.url and _name(req.name) not in pinned:
                problems.append(f"{req.name} comes from {req.url} → [adapt] {proposed_pin(req.name, locked)}")
    for source in _declared_sources(data):
        name = source.get("name", "")
        mapped = adapt.sources.get(name)
        if mapped == "default":
            continue
        if mapped == "mirror" and name in site_sources:
            continue
        if (source.get("priority") or "").lower() == "primary" and not source.get("url"):
            continue
        fix = (f"set [mirrors] sources.{name} in the site config" if mapped == "mirror"
               else f"[adapt] sources = {{ {name} = \"default\" }} (or \"mirror\" with [mirrors] sources.{name})")
        problems.append(f"index {name!r} ({source.get('url', '?')}) has no site mirror → {fix}")
    return problems


_NOT_DIRECT_HINT = ("pin and drop name the method's own dependencies; for a dependency of a dependency use "
                    "add = { name = \"==VERSION\" } (or list it in build_from_source too, to build it at that pin)")


def _is_source_pin(adapt: Adaptations, name: str) -> bool:
    return _name(name) in {_name(n) for n in adapt.build_from_source} and name in adapt.pin


def source_pins_of_dependencies(adapt: Adaptations, present: set[str]) -> dict[str, str]:
    """A package built from source is built at one exact version, its pin, also when it is a dependency of a
    dependency (uv and poetry name those too): such a pin becomes a `name==version` requirement of its own."""
    return {name: version for name, version in adapt.pin.items()
            if _name(name) not in present and _is_source_pin(adapt, name)}


def proposed_pin(name: str, locked: dict[str, str]) -> str:
    """`pin = { name = "<release>" }`: the release the repository's lock (canonical name -> version) points at
    (`0.32.0.dev0` built from git -> `0.32.0`, with the locked version noted)."""
    recorded = locked.get(_name(name))
    if recorded is None or ", " in recorded:
        return f"pin = {{ {name} = \"<version>\" }}"
    release = index_release(recorded)
    note = "" if release == recorded else f" (its lock has {recorded})"
    return f"pin = {{ {name} = \"{release}\" }}{note}"


def _set_pep508_version(text: str, version: str) -> str:
    req = Requirement(text)
    extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
    marker = f"; {req.marker}" if req.marker else ""
    return f"{req.name}{extras}=={version}{marker}"


def _require_dependencies(adapt: Adaptations, present: set[str], where: Path, known: str = "") -> None:
    """[adapt] pin and drop name only what the method depends on: a misspelt name would otherwise do nothing."""
    for name in [*adapt.pin, *adapt.drop]:
        if _name(name) not in present and not _is_source_pin(adapt, name):
            raise UsageError(f"{where}: [adapt] names {name!r}, which the method does not depend on{known}",
                             hint=_NOT_DIRECT_HINT)


def adapt_pyproject(data: dict, adapt: Adaptations, where: Path, mirror_urls: dict[str, str] | None = None) -> dict:
    """The effective pyproject: adaptations applied; with `mirror_urls`, mapped indexes point to mirrors."""
    data = copy.deepcopy(data)
    present = pyproject_names(data)
    added = {**adapt.add, **{n: f"=={v}" for n, v in source_pins_of_dependencies(adapt, present).items()}}
    _require_dependencies(adapt, present, where, f" (it has: {', '.join(sorted(present)) or 'nothing'})")
    dropped = {_name(n) for n in adapt.drop}
    pins = {_name(n): v for n, v in adapt.pin.items()}
    default_sources = {n for n, target in adapt.sources.items() if target == "default"}
    for table in _poetry_tables(data):
        _adapt_poetry_table(table, dropped, pins, default_sources)
    for lst in _pep508_lists(data):
        _adapt_pep508_list(lst, dropped, pins)
    if added:
        _add_dependencies(data, added)
    _adapt_poetry_sources(data.get("tool", {}).get("poetry", {}), default_sources, mirror_urls)
    return data


def _adapt_poetry_table(table: dict, dropped: set[str], pins: dict[str, str], default_sources: set[str]) -> None:
    """One poetry dependency table, in place: dropped names leave, pinned ones become `==version` (a release
    from an index, so no git/path/url keys), entries of an index mapped to the default lose their `source`."""
    for name in list(table):
        key = _name(name)
        if key in dropped:
            del table[name]
            continue
        value = table[name]
        if key in pins:
            table[name] = _pinned_poetry_entry(value, pins[key])
            value = table[name]
        if isinstance(value, list):
            table[name] = [_from_default(e, default_sources) if isinstance(e, dict) else e for e in value]
        elif isinstance(value, dict) and value.get("source") in default_sources:
            value = _from_default(value, default_sources)
            table[name] = value if set(value) - {"version"} else value.get("version", "*")


def _pinned_poetry_entry(value: str | dict | list, version: str) -> str | dict:
    """A poetry dependency pinned to `==version`: a table keeps its other keys (extras, markers) but not its
    source; one left with only a version becomes the plain string."""
    if not isinstance(value, dict):
        return f"=={version}"
    value = {k: v for k, v in value.items() if k not in SOURCE_KEYS}
    value["version"] = f"=={version}"
    return value if set(value) - {"version"} else value["version"]


def _adapt_pep508_list(lst: list, dropped: set[str], pins: dict[str, str]) -> None:
    """A PEP 508 list ([project] dependencies, optional groups), in place; from the end, so deleting keeps the
    indexes still to visit. Lines that are not requirements stay as they are."""
    for index in range(len(lst) - 1, -1, -1):
        try:
            req = Requirement(lst[index])
        except InvalidRequirement:
            continue
        key = _name(req.name)
        if key in dropped:
            del lst[index]
        elif key in pins:
            lst[index] = _set_pep508_version(lst[index], pins[key])


def _add_dependencies(data: dict, add: dict[str, str]) -> None:
    """[adapt] add: into [project] dependencies when the method declares them there, else poetry's table."""
    project_deps = data.get("project", {}).get("dependencies")
    for name, constraint in add.items():
        if isinstance(project_deps, list):
            project_deps.append(name if constraint in ("", "*") else f"{name}{_pep440(constraint)}")
        else:
            data.setdefault("tool", {}).setdefault("poetry", {}).setdefault("dependencies", {})[name] = constraint


def _adapt_poetry_sources(poetry: dict, default_sources: set[str], mirror_urls: dict[str, str] | None) -> None:
    """[[tool.poetry.source]], in place: indexes mapped to the default leave (an empty list goes entirely),
    mapped mirrors replace their URL."""
    if "source" not in poetry:
        return
    kept = []
    for source in poetry["source"]:
        if source.get("name") in default_sources:
            continue
        if mirror_urls and source.get("name") in mirror_urls:
            source = {**source, "url": mirror_urls[source["name"]]}
        kept.append(source)
    poetry["source"] = kept
    if not kept:
        del poetry["source"]


def _from_default(entry: dict, default_sources: set[str]) -> dict:
    """A dependency entry of an index mapped to the default: no `source`, no local label in its version."""
    if entry.get("source") not in default_sources:
        return entry
    entry = {k: v for k, v in entry.items() if k != "source"}
    if isinstance(entry.get("version"), str):
        entry["version"] = strip_local(entry["version"])
    return entry


def index_release(version: str) -> str:
    """The release an index would have for a version built from a checkout: no local label, no `.devN`."""
    public = strip_local(version)
    try:
        parsed = Version(public)
    except InvalidVersion:
        return public
    return re.sub(r"\.?dev\d*$", "", str(parsed)) if parsed.is_devrelease else str(parsed)


def strip_local(version: str) -> str:
    """`2.5.1+cu124` -> `2.5.1` (also inside constraints, `==2.5.1+cu124`): the default index has no local labels."""
    return re.sub(r"\+[A-Za-z0-9]+(?:\.[A-Za-z0-9]+)*", "", version)


# ---------------------------------------------------------------------- the repository's own poetry.lock


def _source_ref(package: dict) -> str | None:
    source = package.get("source") or {}
    return source.get("reference") if source.get("type") == "legacy" else None


def locked_versions(lock: dict) -> dict[str, str]:
    """name -> version of each package in a poetry.lock (several versions of one name: joined with ', ')."""
    found: dict[str, list[str]] = {}
    for package in lock.get("package", []):
        versions = found.setdefault(_name(package["name"]), [])
        if package["version"] not in versions:
            versions.append(package["version"])
    return {name: ", ".join(versions) for name, versions in sorted(found.items())}


def seed_lock(lock: dict, source: dict, adapt: Adaptations,
              mirror_urls: dict[str, str] | None = None) -> tuple[dict, dict[str, str]]:
    """The repository's poetry.lock rewritten to match the adapted pyproject, for poetry to keep every version
    the adaptation does not touch: (seed lock, pins for the pyproject handed to poetry).

    Packages of an index mapped to the default leave the seed (their locked files are the index's, `+cu124`
    builds the default index does not have); a direct dependency among them is pinned to its public version,
    so poetry resolves the same release there. Packages of an index mapped to a mirror point to the mirror.
    Dropped and pinned packages leave the seed: poetry resolves them anew.
    """
    default_sources = {n for n, target in adapt.sources.items() if target == "default"}
    mirror_urls = mirror_urls or {}
    removed = {_name(n) for n in [*adapt.drop, *adapt.pin]}
    direct = pyproject_names(source) - {_name(n) for n in adapt.add}
    kept: list[dict] = []
    public: dict[str, set[str]] = {}
    for package in lock.get("package", []):
        key = _name(package["name"])
        reference = _source_ref(package)
        if key in removed:
            continue
        if reference in default_sources:
            public.setdefault(key, set()).add(strip_local(package["version"]))
            continue
        if reference in mirror_urls:
            package = {**package, "source": {**package["source"], "url": mirror_urls[reference]}}
        kept.append(package)
    pins = {name: versions.pop() for name, versions in public.items()
            if name in direct and len(versions) == 1}
    return {**lock, "package": kept}, pins


def lock_drift(theirs: dict, ours: dict) -> list[dict[str, str | None]]:
    """What moved from the repository's lock to envmgr's: one entry per package, `theirs`/`ours` None when
    it was added or removed."""
    before, after = locked_versions(theirs), locked_versions(ours)
    drift: list[dict[str, str | None]] = []
    for name in sorted(before.keys() | after.keys()):
        if before.get(name) != after.get(name):
            drift.append({"package": name, "theirs": before.get(name), "ours": after.get(name)})
    return drift


def describe_drift(drift: list[dict[str, str | None]]) -> list[str]:
    """`torch: 2.5.1+cu124 → 2.5.1`, `added: x 1.0`, `removed: y 2.0`, one line each."""
    lines = []
    for entry in drift:
        if entry["theirs"] is None:
            lines.append(f"added: {entry['package']} {entry['ours']}")
        elif entry["ours"] is None:
            lines.append(f"removed: {entry['package']} {entry['theirs']}")
        else:
            lines.append(f"{entry['package']}: {entry['theirs']} → {entry['ours']}")
    return lines


def _pep440(constraint: str) -> str:
    constraint = constraint.strip()
    if re.match(r"^\d", constraint):
        return f"=={constraint}"
    return constraint


# ---------------------------------------------------------------------- requirements.txt (pip)


def _index_name(url: str) -> str:
    return urlsplit(url).hostname or url


def effective_requirements(text: str, adapt: Adaptations, where: Path, site_sources: dict[str, str],
                           base: Path | None = None,
                           locked: dict[str, str] | None = None) -> tuple[str, list[str], list[str]]:
    """(effective requirements text, mapped mirror URLs for extra indexes, unreachable problems); `locked`
    (name -> version the repository pins) turns the proposed pins into its versions."""
    lines: list[str] = []
    problems: list[str] = []
    mirrors: list[str] = []
    present: set[str] = set()
    dropped = {_name(n) for n in adapt.drop}
    pins = {_name(n): v for n, v in adapt.pin.items()}
    to_default = False     # an index of the repository mapped to the default index: its local labels go
    raw_lines = _logical_lines(text, base or where.parent, where)
    for line in raw_lines:
        stripped = line.split(" #", 1)[0].strip()
        if not stripped or stripped.startswith("#"):
            continue
        option = re.match(r"^(-i|--index-url|--extra-index-url|-f|--find-links)[\s=]+(\S+)", stripped)
        if option:
            if _map_index_option(option.group(2), adapt, site_sources, mirrors, problems):
                to_default = True
            continue
        if stripped.startswith(("-e ", "--editable")) or stripped.startswith(("git+", "http://", "https://", "./",
                                                                              "../", "/", "file:")):
            problems.append(f"{stripped} is not from an index → install it from an index: [adapt] drop it "
                            "from requirements with a pin of its package name, e.g. pin = { name = \"<version>\" }")
            continue
        if stripped.startswith("-"):
            lines.append(stripped)
            continue
        try:
            req = Requirement(stripped)
        except InvalidRequirement:
            raise UsageError(f"{where}: cannot parse requirement {stripped!r}") from None
        key = _name(req.name)
        present.add(key)
        if key in dropped:
            continue
        if key in pins:
            extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
            lines.append(_set_pep508_version(f"{req.name}{extras}{'; ' + str(req.marker) if req.marker else ''}",
                                             pins[key]))
            continue
        if req.url:
            problems.append(f"{req.name} comes from {req.url} → [adapt] "
                            f"{proposed_pin(req.name, {_name(n): v for n, v in (locked or {}).items()})}")
            continue
        lines.append(str(req))
    if to_default and not mirrors:
        # `torch==2.5.1+cu124` from an index mapped to the default index: the default index's release
        lines = [strip_local(line) if not line.startswith("-") else line for line in lines]
    _require_dependencies(adapt, present, where)
    for name, version in source_pins_of_dependencies(adapt, present).items():
        lines.append(f"{name}=={version}")
    for name, constraint in adapt.add.items():
        lines.append(name if constraint in ("", "*") else f"{name}{_pep440(constraint)}")
    return "\n".join(lines) + "\n", mirrors, problems


def _map_index_option(url: str, adapt: Adaptations, site_sources: dict[str, str], mirrors: list[str],
                      problems: list[str]) -> bool:
    """An index option of the requirements (`--extra-index-url URL`...): its site mirror goes to `mirrors`, an
    index without one to `problems`; True when [adapt] maps it to the default index (its local labels go)."""
    name = _index_name(url)
    mapped = adapt.sources.get(name)
    if mapped == "default":
        return True
    if mapped == "mirror" and name in site_sources:
        mirrors.append(site_sources[name])
        return False
    problems.append(f"index {name!r} ({url}) has no site mirror → [adapt] sources = {{ \"{name}\" = "
                    f"\"default\" }} (or \"mirror\" with [mirrors] sources.\"{name}\")")
    return False


def _logical_lines(text: str, base: Path, where: Path, depth: int = 0) -> list[str]:
    """Lines with continuations joined and `-r other.txt` includes inlined."""
    joined = text.replace("\\\n", " ")
    out: list[str] = []
    for line in joined.splitlines():
        match = re.match(r"^\s*(-r|--requirement|-c|--constraint)[\s=]+(\S+)", line)
        if match and depth < 5:
            include = base / match.group(2)
            if not include.is_file():
                raise UsageError(f"{where}: includes {match.group(2)}, which is not in the method")
            out += _logical_lines(include.read_text(encoding="utf-8"), include.parent, include, depth + 1)
        else:
            out.append(line)
    return out


def raise_if_unreachable(method: str, problems: list[str]) -> None:
    if problems:
        raise UnreachableSources(f"{method}: {len(problems)} dependenc{'y' if len(problems) == 1 else 'ies'} "
                                 "cannot be fetched through the site's mirrors, one fix a line:"
                                 + "".join(f"\n  - {problem}" for problem in problems),
                                 hint=f"add the overrides to the method's envmgr.toml, then `envmgr lock {method}`")
