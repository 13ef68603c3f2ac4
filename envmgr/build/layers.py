"""Per-distribution environment layers and the content-addressed layer store (issue 14).

A locked Python environment (poetry and pip backends) becomes several layers instead of one:

- the venv skeleton (`uv venv`: pyvenv.cfg, bin/python links, activate scripts, _virtualenv.*),
  keyed by (layout, uv, base Python, prefix);
- each locked distribution installed alone (`--no-deps`, hashes required) into the same prefix in
  a staging tree, the skeleton's own files removed, its bytecode compiled by fresh interpreters that
  load nothing but the standard library (`-S`), so its files depend only on (requirement line with
  hashes, Python, prefix, installer, layout): its unit key;
- distributions are grouped to a budget: one of at least BIG_BYTES installed gets a layer of its own,
  the others go to BUCKETS buckets by a hash of their *name*, so a pin bump changes one bucket's
  layer and adding a distribution changes one bucket. At most MAX_ENV_LAYERS environment layers
  (overlay2 stacks at most 128 lower layers; base + method + 60 leaves room for the engine).

Every environment layer lives once in `<cache>/store/layers/<sha256 hex>` (uncompressed tar, named
by its diff ID) with small JSON index files: `store/index/groups/<group key>.json` (diff ID, size,
stamp) and `store/index/dists/<unit key>.json` (installed size; torch's GPU architectures). A layer
is checked by hash on use unless untouched since it was recorded (same size, mtime and inode); a
damaged one is named, removed and made again, never loaded.

All environments of these backends share one physical prefix (PHYSICAL_PREFIX): a layer's paths
are then the same in every method, so two methods that lock the same torch share its layer in the
engine, in registries and in exports. The method layer links `/opt/envmgr/envs/<method>` to it, so
the method's own prefix (PATH, VIRTUAL_ENV, `conda run -n <method>`) stays what it was.

Conda environments (rattler's prefix, with prefix placeholders replaced by the method's own path)
stay one layer: see build.env_layer.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from envmgr.build.layer_facts import ImageFacts, LayerFacts, UnitFacts
from envmgr.core import paths
from envmgr.core.errors import EnvmgrError
from envmgr.core.files import atomic_write
from envmgr.door.containers import BindMount
from envmgr.door.context import Context
from envmgr.images.base import BaseImage
from envmgr.images.image import Layer, file_sha256, measure_layer, write_layer
from envmgr.lock.uv_cache import lend_uv_cache

PHYSICAL_PREFIX = f"{paths.CONTAINER_ENVS_ROOT}/.shared"
BIG_BYTES = 32 * 1024 * 1024
BUCKETS = 32
MAX_ENV_LAYERS = 60
# Stored layers this large or larger are dropped once the engine holds them (the environment is not kept
# twice); smaller ones (the buckets, the skeleton) stay, so a pin bump that moves the buckets above the
# changed one re-sends them from the store instead of installing them again.
RELEASE_BYTES = 32 * 1024 * 1024
STAGE_SKELETON = "skeleton"


def normal_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class Unit:
    """One locked distribution: its normalized name, the requirement line uv installs, and its key."""

    name: str
    requirement: str
    key: str


@dataclass(frozen=True)
class Group:
    """What one environment layer holds: the skeleton, one big distribution, or a bucket of small ones."""

    kind: str                      # "skeleton" | "big" | "bucket"
    label: str                     # "skeleton", the distribution's name, or "bucket-07"
    members: tuple[Unit, ...]
    key: str


def canonical_requirement(text: str) -> tuple[str, str]:
    """(normalized name, canonical line) of one requirement entry: `name==version [; marker]` + sorted hashes.

    Line continuations, comments and the order of the hashes do not matter.
    """
    joined = " ".join(line.split("#", 1)[0].strip().rstrip("\\").strip() for line in text.splitlines())
    hashes = sorted(set(re.findall(r"--hash[= ]\s*(\S+)", joined)))
    head = re.sub(r"--hash[= ]\s*\S+", "", joined).strip()
    head = re.sub(r"\s+", " ", head)
    match = re.match(r"([A-Za-z0-9][A-Za-z0-9._\-]*)", head)
    if not match or "==" not in head or not hashes:
        raise ValueError(f"not an exact, hashed requirement: {text.strip()[:80]!r}")
    name = normal_name(match.group(1))
    head = normal_name(match.group(1)) + head[match.end():]
    return name, head + "".join(f" \\\n    --hash={h}" for h in hashes)


def _digest(data: object) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def units(entries: Iterable[str], python_version: str, installer: str, layout: str,
          prefix: str = PHYSICAL_PREFIX) -> list[Unit]:
    found: dict[str, Unit] = {}
    for entry in entries:
        name, line = canonical_requirement(entry)
        key = _digest({"requirement": line, "python": python_version, "prefix": prefix, "installer": installer,
                       "layout": layout})
        found[name] = Unit(name, line, key)
    return [found[name] for name in sorted(found)]


def skeleton_key(python_version: str, uv: str, layout: str, prefix: str = PHYSICAL_PREFIX) -> str:
    return _digest({"skeleton": True, "python": python_version, "uv": uv, "prefix": prefix, "layout": layout})


def bucket_of(name: str, buckets: int = BUCKETS) -> int:
    return int(hashlib.sha256(normal_name(name).encode()).hexdigest()[:8], 16) % buckets


def _group_key(layout: str, kind: str, members: Iterable[Unit], dropped: dict[str, str]) -> str:
    """A group's key: its members' unit keys, and what each leaves to another layer (only when it does, so
    the keys of environments without shared files are what they always were)."""
    members = list(members)
    data: dict[str, object] = {"layout": layout, "kind": kind, "members": sorted(u.key for u in members)}
    left = {u.key: dropped[u.key] for u in members if dropped.get(u.key)}
    if left:
        data["dropped"] = left
    return _digest(data)


def plan_groups(dists: list[Unit], sizes: dict[str, int | None], layout: str, *, big: int = BIG_BYTES,
                buckets: int = BUCKETS, budget: int = MAX_ENV_LAYERS,
                dropped: dict[str, str] | None = None) -> list[Group]:
    """The distribution layers, bottom first: big ones by size (largest lowest), then the buckets.

    Largest lowest: a layer is shared in the engine only when every layer below it is too (its chain
    ID), so the layers most costly to keep twice (torch, the CUDA libraries) sit where methods with the
    same torch still agree. A distribution of unknown size counts as small (it is installed anyway).
    `dropped`: unit key -> a digest of the shared paths it leaves to another unit (shared_files).
    """
    dropped = dropped or {}
    def size(unit: Unit) -> int:
        return sizes.get(unit.key) or 0

    bigs = [u for u in dists if size(u) >= big]
    room = max(0, budget - 1 - buckets)   # the skeleton, then the buckets
    bigs.sort(key=lambda u: (-size(u), u.name))
    bigs = bigs[:room]                     # past the budget, the smallest big ones join their buckets
    big_names = {u.name for u in bigs}
    groups = [Group("big", u.name, (u,), _group_key(layout, "big", (u,), dropped)) for u in bigs]
    by_bucket: dict[int, list[Unit]] = {}
    for unit in dists:
        if unit.name not in big_names:
            by_bucket.setdefault(bucket_of(unit.name, buckets), []).append(unit)
    for index in sorted(by_bucket):
        members = tuple(sorted(by_bucket[index], key=lambda u: u.name))
        groups.append(Group("bucket", f"bucket-{index:02d}", members, _group_key(layout, "bucket", members, dropped)))
    return groups


@dataclass
class Shared:
    """The paths several distributions of one environment claim, and where each goes."""

    owners: dict[str, str]                    # path -> the distribution whose layer holds it
    claims: dict[str, dict[str, str]]         # path -> {distribution: RECORD hash}
    dropped: dict[str, list[str]]             # unit key -> the paths it leaves to another layer
    dropped_bytes: dict[str, int]             # unit key -> their sizes (per its RECORD)

    def digests(self) -> dict[str, str]:
        return {key: _digest(paths) for key, paths in self.dropped.items() if paths}

    def differing(self) -> list[str]:
        return [path for path in sorted(self.owners) if len(set(self.claims[path].values())) > 1]


def shared_files(files: dict[str, dict]) -> Shared:
    """`files`: unit key -> its RECORD rows as the split left them ({"name", "files": [[path, hash, size]]})."""
    claims: dict[str, dict[str, str]] = {}
    for data in files.values():
        for path, digest, _size in data["files"]:
            claims.setdefault(path, {})[data["name"]] = digest
    owners = shared_owners(claims)
    dropped: dict[str, list[str]] = {}
    dropped_bytes: dict[str, int] = {}
    for key, data in files.items():
        for path, _hash, size in data["files"]:
            if owners.get(path, data["name"]) != data["name"]:
                dropped.setdefault(key, []).append(path)
                dropped_bytes[key] = dropped_bytes.get(key, 0) + (int(size) if str(size).isdigit() else 0)
    return Shared(owners, claims, {k: sorted(v) for k, v in dropped.items()}, dropped_bytes)


# ---------------------------------------------------------------------- the store


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


@dataclass
class LayerStore:
    """`<cache>/store`: layers by diff ID, group and distribution records by key."""

    root: Path
    warn: object = None                       # ctx.ui.warn

    @property
    def layers(self) -> Path:
        return self.root / "layers"

    def _group_record(self, key: str) -> Path:
        return self.root / "index" / "groups" / f"{key}.json"

    def _dist_record(self, key: str) -> Path:
        return self.root / "index" / "dists" / f"{key}.json"

    def layer_path(self, diff_id: str) -> Path:
        return self.layers / diff_id.split(":", 1)[1]

    def group(self, key: str, need_bytes: frozenset[str] = frozenset()) -> Layer | None:
        """The group's layer when its record and bytes agree; None when missing or damaged (removed then).

        A layer whose bytes were handed to the engine (`release`) is returned without a file, unless its
        diff ID is in `need_bytes` (the engine lacks it where the image needs it): then None, made again.
        """
        record = self._group_record(key)
        try:
            known = json.loads(record.read_text())
            diff_id, size = str(known["diff_id"]), int(known["size"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            self._say(f"layer store record {record.name} is unreadable: making its layer again")
            return None
        tar = self.layer_path(diff_id)
        if not tar.is_file():
            if known.get("released") and diff_id not in need_bytes:
                return Layer(path=tar, diff_id=diff_id, size=size)
            return None
        if known.get("stamp") != _stamp(tar):
            if tar.stat().st_size != size or "sha256:" + file_sha256(tar)[0] != diff_id:
                self._say(f"stored layer {tar.name[:12]} is damaged (its bytes do not hash to {diff_id[:19]}): "
                          "making it again")
                tar.unlink(missing_ok=True)
                return None
            self._record_group(key, diff_id, size, tar)
        return Layer(path=tar, diff_id=diff_id, size=size)

    def _say(self, message: str) -> None:
        if callable(self.warn):
            self.warn(message)

    def _record_group(self, key: str, diff_id: str, size: int, tar: Path) -> None:
        atomic_write(self._group_record(key), json.dumps({"diff_id": diff_id, "size": size, "stamp": _stamp(tar)}))

    def put_group(self, key: str, trees: list[tuple[Path, str]], progress=None) -> Layer:
        """Write a layer from host trees into the store (under a unique temporary name, then renamed)."""
        self.layers.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=self.layers, prefix=".new-", suffix=".tar")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            layer = write_layer(tmp, trees=trees, progress=progress)
            final = self.layer_path(layer.diff_id)
            os.replace(tmp, final)   # same bytes whoever wins: a concurrent writer of this layer is harmless
        finally:
            tmp.unlink(missing_ok=True)
        self._record_group(key, layer.diff_id, layer.size, final)
        return Layer(path=final, diff_id=layer.diff_id, size=layer.size)

    def release(self, diff_ids: Iterable[str], at_least: int = RELEASE_BYTES) -> int:
        """Drop the stored bytes of these layers (of `at_least` bytes or more): the engine holds them now.

        Their records stay, marked released, so the next build still knows their diff IDs without
        installing anything; a build that needs their bytes again (the engine lost them, or needs them on
        another chain) makes them again, and an export reads them back from the engine. Returns the bytes
        freed.
        """
        wanted = set(diff_ids)
        freed = 0
        for diff_id, records in self.recorded_diff_ids().items():
            if diff_id not in wanted:
                continue
            tar = self.layer_path(diff_id)
            try:
                size = tar.stat().st_size
            except FileNotFoundError:
                size = -1
            if 0 <= size < at_least:
                continue
            for record in records:
                try:
                    known = json.loads(record.read_text())
                except (OSError, ValueError):
                    continue
                if known.get("diff_id") == diff_id and not known.get("released"):
                    atomic_write(record, json.dumps({**known, "released": True, "stamp": None}))
            if size >= 0:
                tar.unlink(missing_ok=True)
                freed += size
        return freed

    def recorded(self, key: str) -> dict | None:
        """A group's record as stored (diff ID, size, released...), None when absent or unreadable."""
        try:
            data = json.loads(self._group_record(key).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def record_in_engine(self, key: str, diff_id: str, size: int) -> None:
        """Record a layer this store never held that the engine does (learned from an image's labels):
        released, as if its bytes had been handed over."""
        atomic_write(self._group_record(key), json.dumps({"diff_id": diff_id, "size": size, "stamp": None,
                                                          "released": True}))

    def record_sent(self, key: str, layer: Layer) -> None:
        """Record a layer that goes from its trees straight into the engine (never written here): released.

        Should the build fail before the engine holds it, the next build finds the engine lacking it and
        makes it again (see build._assemble)."""
        atomic_write(self._group_record(key), json.dumps({"diff_id": layer.diff_id, "size": layer.size,
                                                          "stamp": None, "released": True}))

    def dist(self, key: str) -> dict:
        try:
            data = json.loads(self._dist_record(key).read_text())
            return data if isinstance(data, dict) and isinstance(data.get("size"), int) else {}
        except (OSError, ValueError):
            return {}

    def put_dist(self, key: str, **data: object) -> None:
        atomic_write(self._dist_record(key), json.dumps(dict(sorted(data.items()))))

    def _files_record(self, key: str) -> Path:
        return self.root / "index" / "files" / f"{key}.json"

    def unit_files(self, key: str) -> dict | None:
        """A unit's RECORD rows as its split left them ({"name", "record", "files"}), None when not known."""
        try:
            data = json.loads(self._files_record(key).read_text())
        except (OSError, ValueError):
            return None
        ok = isinstance(data, dict) and isinstance(data.get("name"), str) and isinstance(data.get("files"), list)
        return data if ok else None

    def put_unit_files(self, key: str, data: dict) -> None:
        atomic_write(self._files_record(key), json.dumps(data, sort_keys=True))

    def recorded_sizes(self) -> dict[str, int]:
        """diff ID -> size, for every layer a record names (its bytes here or in the engine)."""
        found: dict[str, int] = {}
        root = self.root / "index" / "groups"
        for record in sorted(root.glob("*.json")) if root.is_dir() else []:
            try:
                known = json.loads(record.read_text())
                found[str(known["diff_id"])] = int(known["size"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return found

    def recorded_diff_ids(self) -> dict[str, list[Path]]:
        """diff ID -> the group records that name it (gc)."""
        found: dict[str, list[Path]] = {}
        root = self.root / "index" / "groups"
        for record in sorted(root.glob("*.json")) if root.is_dir() else []:
            try:
                found.setdefault(str(json.loads(record.read_text())["diff_id"]), []).append(record)
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return found


def store_for(ctx: Context) -> LayerStore:
    return LayerStore(ctx.cache_dir / "store", warn=ctx.ui.warn)


# ---------------------------------------------------------------------- installing units


@dataclass
class EnvLayers:
    """An environment's layers, bottom first, and what they say about GPUs."""

    layers: list[Layer]
    labels: list[str]                     # per layer: "skeleton", a distribution's name, "bucket-NN"
    gpu_archs: list[str] | None = None    # torch's compiled GPU architectures ([] without a CUDA torch)
    installed: list[str] = field(default_factory=list)   # the distributions installed by this build
    # per layer: its group key and its distributions (layer_facts.UnitFacts), recorded in the image's labels
    groups: list[tuple[str | None, list[UnitFacts]]] = field(default_factory=list)
    learned: list[str] = field(default_factory=list)     # distributions whose facts came from the engine's images




# Sources per compiling process: fixed, so a unit's bytes never depend on the machine. 500: torch's ~2,300
# sources run as 5 processes; smaller runs cost more process starts than they gain on 2 cores (measured).
COMPILE_CHUNK_FILES = 500


def bytecode_sources(rows: list[str]) -> list[str]:
    """The sources compileall compiles of a unit: `.py` files outside `__pycache__`, as `./path` from site-packages.

    A name the `-i` list cannot carry (a newline, not UTF-8) is left uncompiled: Python compiles it on import.
    """
    found: set[str] = set()
    for rel in rows:
        parts = rel.split("/")
        if not rel.endswith(".py") or "__pycache__" in parts or ".." in parts or "\n" in rel:
            continue
        try:
            rel.encode("utf-8")
        except UnicodeEncodeError:
            continue
        found.add("./" + rel)
    return sorted(found)


def bytecode_chunks(sources: list[str], size: int = COMPILE_CHUNK_FILES) -> list[list[str]]:
    """`sources` in byte order (as `LC_ALL=C sort`), cut into runs of `size`: one fresh interpreter each."""
    ordered = sorted(set(sources), key=lambda rel: rel.encode("utf-8"))
    return [ordered[start:start + size] for start in range(0, len(ordered), size)]


def _source_of(*functions: object) -> str:
    import inspect
    import textwrap

    return "\n\n".join(textwrap.dedent(inspect.getsource(function)) for function in functions)  # type: ignore[arg-type]


def shared_owners(claims: dict[str, dict[str, str]]) -> dict[str, str]:
    """path -> the one distribution whose layer holds it, for each path several distributions' RECORDs claim.

    `claims`: path (relative to the prefix) -> {normalized name: RECORD hash}. The rule is fixed and
    depends on the names alone: the distribution whose normalized name sorts first (byte order) owns it,
    with its own bytes (its RECORD's hash). Files one distribution alone claims are not listed.
    """
    return {path: min(names, key=lambda name: name.encode("utf-8"))
            for path, names in claims.items() if len(names) > 1}


def record_digest(data: bytes, algorithm: str = "sha256") -> str:
    """A RECORD hash field: `<algorithm>=<urlsafe base64 without padding>`."""
    import base64
    import hashlib

    raw = hashlib.new(algorithm, data).digest()
    return algorithm + "=" + base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


# Hash algorithms a RECORD may use (the wheel spec forbids md5 and sha1).
RECORD_ALGORITHMS = ("sha256", "sha384", "sha512", "sha3_256", "sha3_384", "sha3_512", "blake2b", "blake2s")
# RECORD rows that carry no hash by the wheel spec: RECORD itself and its signatures. Every other row
# must have one (uv writes hashes for what it makes: scripts, INSTALLER, REQUESTED, direct_url.json).
UNHASHED_RECORD_FILES = ("RECORD", "RECORD.jws", "RECORD.p7s")


SPLIT_SCRIPT = r"""
import csv, os, re, subprocess, sys
from concurrent.futures import ThreadPoolExecutor

normal = lambda name: re.sub(r"[-_.]+", "-", name).lower()


class SplitError(Exception):
    pass


def file_digest(path, algorithm):
    import base64, hashlib
    digest = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        while True:
            block = fh.read(1 << 20)
            if not block:
                break
            digest.update(block)
    return algorithm + "=" + base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode("ascii")


def read_units(prefix, site, keys):
    # normal name -> (dist-info entry, unit key, {path in prefix: (hash, size)}, RECORD's path in prefix)
    found = {}
    for entry in sorted(os.listdir(site)):
        if not entry.endswith(".dist-info"):
            continue
        info = os.path.join(site, entry)
        with open(os.path.join(info, "METADATA"), encoding="utf-8") as fh:
            name = normal(next(line.split(":", 1)[1].strip() for line in fh if line.lower().startswith("name:")))
        if name not in keys:
            raise SplitError(f"{entry}: installed, but not one of the locked distributions of this step")
        rows = {}
        with open(os.path.join(info, "RECORD"), newline="", encoding="utf-8") as fh:
            for row in csv.reader(fh):
                if not row:
                    continue
                path = os.path.normpath(os.path.join(site, row[0]))   # relpath's cost, 60k times, without it
                if not path.startswith(prefix.rstrip("/") + "/"):
                    raise SplitError(f"{name}: its RECORD names a file outside the environment: {row[0]}")
                inner = path[len(prefix.rstrip("/")) + 1:]
                rows[inner] = (row[1] if len(row) > 1 else "", row[2] if len(row) > 2 else "")
        found[name] = (entry, keys.pop(name), rows, os.path.relpath(os.path.join(info, "RECORD"), prefix))
    if keys:
        raise SplitError("installed without a dist-info: " + " ".join(sorted(keys)))
    return found


def to_check(units, owners):
    # (name, path, RECORD hash) of every file a unit of this step keeps: the files its layer will hold
    work = []
    for name, (entry, key, rows, record) in sorted(units.items()):
        for inner, (digest, _size) in sorted(rows.items()):
            if owners.get(inner, name) != name or inner == record:
                continue
            if not digest:
                same_info = os.path.dirname(inner) == os.path.dirname(record)
                if same_info and os.path.basename(inner) in UNHASHED_RECORD_FILES:
                    continue
                raise SplitError(f"{name}: its RECORD lists {inner} without a hash (every installed file "
                                 "must have one)")
            algorithm = digest.split("=", 1)[0]
            if algorithm not in RECORD_ALGORITHMS:
                raise SplitError(f"{name}: its RECORD hashes {inner} with {algorithm!r}, not a hash envmgr "
                                 "accepts")
            work.append((name, inner, digest))
    return work


def check_files(prefix, units, owners, claims):
    # Every kept file against its RECORD hash; returns {name: [paths]} of owners whose bytes another claimant
    # of this step overwrote (uv installs wheels in parallel: the last writer of a shared path is a race).
    work = to_check(units, owners)

    def actual(item):
        path = os.path.join(prefix, item[1])
        if os.path.islink(path) or not os.path.isfile(path):
            return None
        return file_digest(path, item[2].split("=", 1)[0])

    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        found = list(pool.map(actual, work))
    again = {}
    suspect = {}
    for (name, inner, digest), got in zip(work, found):
        if got == digest:
            continue
        if got is None:
            raise SplitError(f"{name}: {inner} is missing or not a regular file (its RECORD lists it)")
        rivals = {other: h for other, h in claims.get(inner, {}).items() if other != name and other in units}
        if got in rivals.values():
            again.setdefault(name, []).append(inner)
            continue
        suspect.setdefault(name, []).append((inner, got))
    return again, suspect


def check_published(prefix, units, suspect, fresh, fresh_prefix):
    # Installed bytes that differ from their RECORD: changed since the download (the uv cache uv hard-links
    # from), or a wheel published with a RECORD that does not match its own files. The distribution is
    # downloaded again, hash-checked against the lock, without the cache, into a prefix of its own: the same
    # bytes there are the wheel's own (kept, with the hashes of those bytes, and said); others stop the build.
    for name in sorted(suspect):
        entry, key, rows, record = units[name]
        changed = f"{name}: {suspect[name][0][0]} does not match the hash in its RECORD (its installed bytes " \
                  "were changed: a modified file in the uv cache?)"
        if not fresh:
            raise SplitError(changed)
        print(f"ENVMGR-PHASE downloading {name} again without the cache: {len(suspect[name])} file(s) differ "
              "from its RECORD", flush=True)
        done = subprocess.run(["sh", fresh, key], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if done.returncode != 0:
            raise SplitError(changed + " (downloading it again without the cache failed)")
        for inner, got in suspect[name]:
            again = os.path.join(fresh_prefix, inner)
            if os.path.islink(again) or not os.path.isfile(again) or file_digest(again, got.split("=", 1)[0]) != got:
                raise SplitError(changed)
            rows[inner] = (got, rows[inner][1])
        print(f"{WARN}{name}: its wheel, as published, has a RECORD that does not match {len(suspect[name])} of its "
              f"own files (e.g. {suspect[name][0][0]}); a fresh download has the same bytes, so they are kept, "
              "recorded with their own hashes", flush=True)


def move_units(prefix, envs, site, units, owners):
    plans = []
    in_site_prefix = os.path.relpath(site, prefix) + os.sep
    for name, (entry, key, rows, record) in sorted(units.items()):
        in_site = []
        for inner in sorted(rows):
            source = os.path.join(prefix, inner)
            owner = owners.get(inner, name)
            if owner != name:   # another distribution's layer holds it
                if owner not in units and os.path.lexists(source):
                    os.remove(source)
                continue
            target = os.path.join(envs, "d-" + key, inner)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.rename(source, target)
            if inner.startswith(in_site_prefix) and os.path.isfile(target):
                in_site.append(inner[len(in_site_prefix):])
        unit_site = os.path.join(envs, "d-" + key, os.path.relpath(site, prefix))
        plans.append((unit_site, key, bytecode_chunks(bytecode_sources(in_site))))
        record_hash = file_digest(os.path.join(envs, "d-" + key, record), "sha256")
        with open(os.path.join(envs, f"files-{key}.json"), "w", encoding="utf-8") as fh:
            json.dump({"name": name, "record": record_hash,
                       "files": [[inner, digest, size] for inner, (digest, size) in sorted(rows.items())]}, fh)
    return plans


def install_alone(prefix, envs, units, again, alone):
    # An owner whose bytes of a shared path lost the install race: install it alone (same prefix, so the
    # same script shebangs) and take those files from there, checked against its RECORD.
    for name in sorted(again):
        entry, key, rows, record = units[name]
        if not alone:
            raise SplitError(f"{name}: shared files were overwritten and no way to install it alone was given")
        print(f"ENVMGR-PHASE installing {name} alone: its own bytes of {len(again[name])} shared file(s)", flush=True)
        subprocess.run(["sh", alone, key], check=True, stdout=subprocess.DEVNULL)
        for inner in sorted(again[name]):
            source = os.path.join(prefix, inner)
            digest = rows[inner][0]
            if os.path.islink(source) or not os.path.isfile(source) or \
                    file_digest(source, digest.split("=", 1)[0]) != digest:
                raise SplitError(f"{name}: {inner} does not match the hash in its RECORD when installed alone")
            os.replace(source, os.path.join(envs, "d-" + key, inner))


def main(argv):
    prefix, envs, units_file, skeleton_file, plan_file = argv[1:6]
    others_file = argv[6] if len(argv) > 6 else ""
    alone = argv[7] if len(argv) > 7 else ""
    fresh = argv[8] if len(argv) > 8 else ""
    fresh_prefix = argv[9] if len(argv) > 9 else FRESH_PREFIX
    keys = dict(reversed(line.split()) for line in open(units_file) if line.strip())
    skeleton = {line.strip()[2:] for line in open(skeleton_file) if line.strip()}
    lib = os.path.join(prefix, "lib")
    site = [os.path.join(lib, d, "site-packages") for d in os.listdir(lib) if d.startswith("python")][0]
    units = read_units(prefix, site, keys)
    claims = {}   # path -> {name: RECORD hash}: the environment's distributions outside this step, then this step's
    if others_file:
        with open(others_file, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    name, inner, digest = json.loads(line)
                    claims.setdefault(inner, {})[name] = digest
    for name, (entry, key, rows, record) in units.items():
        for inner, (digest, _size) in rows.items():
            claims.setdefault(inner, {})[name] = digest
    owners = shared_owners(claims)
    again, suspect = check_files(prefix, units, owners, claims)
    check_published(prefix, units, suspect, fresh, fresh_prefix)
    lists = os.path.dirname(plan_file)
    plans = move_units(prefix, envs, site, units, owners)
    if os.path.exists(os.path.join(prefix, ".lock")):
        os.remove(os.path.join(prefix, ".lock"))   # uv's own install-time lock file: in no layer
    left = [os.path.relpath(os.path.join(d, f), prefix) for d, _, files in os.walk(prefix) for f in files]
    left = sorted(p for p in left if p not in skeleton)
    if left:
        raise SplitError("files no RECORD names (cannot be given to a distribution's layer): " + " ".join(left[:10]))
    install_alone(prefix, envs, units, again, alone)
    with open(plan_file, "w") as plan:
        for unit_site, key, chunks in sorted(plans, key=lambda plan: -len(plan[2])):   # the longest work first
            for index, chunk in enumerate(chunks):
                listing = os.path.join(lists, f"{key}-{index:04d}.txt")
                with open(listing, "w", encoding="utf-8") as fh:
                    fh.write("".join(rel + "\n" for rel in chunk))
                plan.write(f"{unit_site} {listing}\n")


try:
    main(sys.argv)
except SplitError as error:
    print(f"{SPLIT_ERROR}{error}", flush=True)
    sys.exit(1)
except Exception as error:   # noqa: BLE001 - one line for the user, whatever went wrong
    print(f"{SPLIT_ERROR}splitting the environment by RECORD failed: {type(error).__name__}: {error}", flush=True)
    sys.exit(1)
"""
SPLIT_ERROR = "ENVMGR-SPLIT-ERROR "
SPLIT_WARN = "ENVMGR-SPLIT-WARN "
FRESH_PREFIX = "/tmp/envmgr-fresh"
SPLIT_SCRIPT = (f"from __future__ import annotations\nimport json\nCOMPILE_CHUNK_FILES = {COMPILE_CHUNK_FILES}\n"
                f"SPLIT_ERROR = {SPLIT_ERROR!r}\nWARN = {SPLIT_WARN!r}\nFRESH_PREFIX = {FRESH_PREFIX!r}\n"
                f"RECORD_ALGORITHMS = {RECORD_ALGORITHMS!r}\n"
                f"UNHASHED_RECORD_FILES = {UNHASHED_RECORD_FILES!r}\n"
                + _source_of(bytecode_sources, bytecode_chunks, shared_owners) + "\n" + SPLIT_SCRIPT)


def _install_script(python: str, want_skeleton: bool, read_archs: bool) -> tuple[str, str]:
    """Install every listed unit in one container, then give each distribution its own tree.

    One `uv pip install` of all the units (uv installs each wheel on its own, in parallel) into the
    prefix, hard-linking from its cache when the cache is lent to the stage (envmgr.lock.uv_cache); then
    each distribution's files, as its RECORD names them, are renamed into stage/d-<key> (the staging
    folder is mounted at the prefix's parent: renames, not copies), and its bytecode is compiled
    there by fresh interpreters that load only the standard library (-S), each given a fixed run of
    COMPILE_CHUNK_FILES of the unit's sources, so a unit's bytes depend on the unit alone, whatever
    the machine's core count. Nothing writes into an installed file: renames, and new pyc files
    (compileall writes a temporary file and renames it), so the cache's linked files stay intact.
    A file no RECORD names stops the build, except uv's empty install-time `.lock`, which no layer
    holds (a single install leaves it in the prefix). A source that does not compile stays without
    a pyc, as in a single install.

    Before anything moves, every file a unit keeps is hashed and compared with its RECORD (a changed
    file, e.g. in the uv cache uv hard-links from, stops the build naming the distribution and the
    file). A path several distributions' RECORDs claim (the `nvidia/__init__.py` of every CUDA wheel,
    a console script two distributions both install) goes to one unit only: see shared_owners.

    Two scripts: the install (followed by the split), and the split alone. With `read_archs`, torch's GPU
    facts are read while the whole environment is there, between install and split: the step reads them
    from torch's library (gpu_image.FILES_SCRIPT: bytes only, no package code runs) and goes on to the
    split; when those bytes cannot tell, the step stops there, torch is imported in a box of its own
    (gpu_image.read_archs_boxed: package code, which must not share this step's network, netrc and uv
    cache), and the split runs as a step of its own (the second script).
    """
    uv, work, envs, prefix = paths.CONTAINER_UV, paths.CONTAINER_WORK, paths.CONTAINER_ENVS_ROOT, PHYSICAL_PREFIX
    compile_one = (f'cd "$1" && exec env PYTHONHASHSEED=0 {python} -S -B -m compileall -f -q '
                   f'--invalidation-mode unchecked-hash -i "$2" >/dev/null')
    lines = [
        f"rm -rf {prefix}",
        f"{uv} venv --quiet --python {python} {prefix}",
        f"(cd {prefix} && find . ! -type d | LC_ALL=C sort) > {envs}/.skeleton-files",
    ]
    if want_skeleton:
        lines.append(f"cp -a {prefix} {envs}/d-{STAGE_SKELETON}")
    lines += [
        f"if [ -s {work}/requirements.txt ]; then",
        f"  {uv} pip install --python {prefix}/bin/python --require-hashes --no-deps -r {work}/requirements.txt",
        "fi",
        "echo ENVMGR-PHASE installed",
    ]
    split = [
        "mkdir -p /tmp/bytecode",
        f"{python} -S -B {work}/split.py {prefix} {envs} {work}/units.txt {envs}/.skeleton-files "
        f"/tmp/bytecode/plan {work}/others.jsonl {work}/alone.sh {work}/fresh.sh",
        "echo ENVMGR-PHASE split",
        f"xargs -r -n 2 -P \"$(nproc)\" sh -c '{compile_one}' compile < /tmp/bytecode/plan || true",
        "echo ENVMGR-PHASE compiled",
        f"rm -rf {prefix} {envs}/.skeleton-files",
    ]
    if read_archs:   # torch's facts need the whole environment: read between install and split
        gate = [f"if ! {python} -S -I -B {work}/archs.py {prefix}; then echo ENVMGR-PHASE gpu-facts-need-import; "
                "exit 0; fi",
                "echo ENVMGR-PHASE gpu-facts"]
        return "\n".join(lines + gate + split), "\n".join(split)
    return "\n".join(lines + split), ""


def _alone_script(python: str) -> str:
    """Install one unit alone into the (emptied) prefix: `sh alone.sh <unit key>` (see SPLIT_SCRIPT)."""
    uv, work, prefix = paths.CONTAINER_UV, paths.CONTAINER_WORK, PHYSICAL_PREFIX
    return "\n".join(["set -e", f"rm -rf {prefix}", f"{uv} venv --quiet --python {python} {prefix}",
                      f"{uv} pip install --quiet --python {prefix}/bin/python --require-hashes --no-deps "
                      f"-r {work}/alone/\"$1\".txt", ""])


def _fresh_script(python: str) -> str:
    """Download one unit again, hash-checked, without the uv cache, into a prefix of its own (see SPLIT_SCRIPT):
    `sh fresh.sh <unit key>`."""
    uv, work, fresh = paths.CONTAINER_UV, paths.CONTAINER_WORK, FRESH_PREFIX
    return "\n".join(["set -e", f"rm -rf {fresh}", f"{uv} venv --quiet --python {python} {fresh}",
                      f"{uv} pip install --quiet --no-cache --python {fresh}/bin/python --require-hashes --no-deps "
                      f"-r {work}/alone/\"$1\".txt", f"rm -rf {fresh}/bin", ""])


def stage_units(ctx: Context, base: BaseImage, method: str, todo: list[Unit], stage: Path,
                extra_indexes: list[str], want_skeleton: bool, read_archs: bool,
                others: Iterable[tuple[str, str, str]] = ()) -> list[str] | None:
    """Install `todo` into `stage/d-<key>` (and the skeleton into stage/d-skeleton) in one container step.

    `others`: (name, path, RECORD hash) of the files of the environment's distributions not installed
    here, so that a path this step shares with them goes to the one layer shared_owners picks. Each
    unit's RECORD rows are left in `stage/files-<key>.json`. Returns torch's GPU architectures when
    `read_archs`, else None.
    """
    from envmgr.build.gpu_image import FILES_SCRIPT, read_archs_boxed
    from envmgr.lock.backends.common import run_step, uv_mounts, uv_step_env

    work_root = ctx.cache_dir / "work"
    work_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work_root, prefix=f"units-{method}-") as work:
        (Path(work) / "requirements.txt").write_text("".join(u.requirement + "\n" for u in todo))
        (Path(work) / "units.txt").write_text("".join(f"{u.key} {u.name}\n" for u in todo))
        (Path(work) / "split.py").write_text(SPLIT_SCRIPT)
        (Path(work) / "archs.py").write_text(FILES_SCRIPT)
        (Path(work) / "others.jsonl").write_text("".join(json.dumps(list(row)) + "\n" for row in others))
        (Path(work) / "alone.sh").write_text(_alone_script(base.python))
        (Path(work) / "fresh.sh").write_text(_fresh_script(base.python))
        (Path(work) / "alone").mkdir()
        for unit in todo:
            (Path(work) / "alone" / f"{unit.key}.txt").write_text(unit.requirement + "\n")
        script, split_script = _install_script(base.python, want_skeleton, read_archs)
        lines: list[str] = []
        archs: list[str] = []
        started = time.monotonic()
        with ctx.ui.progress(f"installing {len(todo)} distributions, one layer unit each", total=len(todo),
                             unit="packages") as task:
            def on_line(line: str) -> None:
                lines.append(line)
                if line.strip().startswith("+ "):
                    task.advance(1)
                elif line.startswith(SPLIT_WARN):
                    ctx.ui.warn(line[len(SPLIT_WARN):])
                elif line.startswith("ENVMGR-PHASE "):
                    ctx.ui.log(f"{line} at {time.monotonic() - started:.1f} s")

            mounts = [BindMount(stage, paths.CONTAINER_ENVS_ROOT, read_only=False),
                      BindMount(Path(work), paths.CONTAINER_WORK, read_only=True)]
            env = uv_step_env(ctx, extra_indexes)
            with lend_uv_cache(ctx.cache_dir, stage, on_wait=lambda: ctx.ui.step(
                    "waiting for the uv cache (another build is installing with it)")) as lent:
                if lent is None:   # uv copies from a cache mounted on its own
                    mounts += uv_mounts(ctx)
                else:              # cache and prefix on one mount: uv hard-links
                    mounts.append(BindMount(ctx.uv_binary(), paths.CONTAINER_UV, read_only=True))
                    env.update(UV_CACHE_DIR=f"{paths.CONTAINER_ENVS_ROOT}/{lent}", UV_LINK_MODE="hardlink")
                ctx.ui.log(f"uv cache: {'hard links from the lent cache' if lent else 'copies (cache not movable)'}")
                try:
                    run_step(ctx, base, f"installing {method}'s environment", script, mounts, env,
                             on_line=on_line, method=method)
                    read = _archs_read_in_step(lines) if read_archs else None
                    if read is not None:
                        archs = read
                    elif split_script:   # the step's read could not tell: torch imported, boxed, then the split
                        archs = read_archs_boxed(ctx, method, base, stage / Path(PHYSICAL_PREFIX).name,
                                                 PHYSICAL_PREFIX)
                        ctx.ui.log(f"ENVMGR-PHASE gpu-facts (torch imported) at {time.monotonic() - started:.1f} s")
                        run_step(ctx, base, f"splitting {method}'s environment into layers", split_script, mounts,
                                 env, on_line=on_line, method=method)
                except EnvmgrError:
                    said = [line[len(SPLIT_ERROR):] for line in lines if line.startswith(SPLIT_ERROR)]
                    if not said:
                        raise
                    raise EnvmgrError(f"{method}: {said[-1]}", hint="nothing was stored or tagged; run with -v for "
                                      "the install's output") from None
    return archs if read_archs else None


def _archs_read_in_step(lines: list[str]) -> list[str] | None:
    """The GPU architectures the install step read from torch's files (after its install), None when it could not
    tell (see _install_script)."""
    from envmgr.build.gpu_image import FILES_MARK

    after = lines[lines.index("ENVMGR-PHASE installed") + 1:] if "ENVMGR-PHASE installed" in lines else []
    said = [line[len(FILES_MARK):] for line in after if line.startswith(FILES_MARK)]
    if not said:
        return None
    found = json.loads(said[-1])
    return [str(arch) for arch in found] if isinstance(found, list) else None


# Layers this process measured for the engine (send mode), by diff ID, with the trees their bytes are made
# from; an entry lasts while those trees do (until the build's exit stack closes). A second look at the
# environment within one build (build._assemble's `need_bytes` pass) takes them from here: the store
# records them as released, and the engine has not received them yet.
_SENT: dict[str, Layer] = {}


def _sent_layer(found: Layer) -> Layer:
    """`found` (from the store), or the measured layer with its trees when the store only knows it as sent."""
    sent = _SENT.get(found.diff_id)
    if found.trees or found.path.is_file() or sent is None or not all(tree.is_dir() for tree, _ in sent.trees):
        return found
    return sent


def tree_size(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            total += st.st_size if not os.path.islink(os.path.join(dirpath, name)) else 0
    return total


def _write_groups(ctx: Context, store: LayerStore, missing: list[tuple[Group, list[tuple[Path, str]]]],
                  send: bool = False) -> dict[str, Layer]:
    """Write the missing layers, a few at a time (tar writing and hashing release the GIL), largest first;
    each distribution's tree is removed once its layer is in the store.

    With `send` (a build that loads the image next), a layer of RELEASE_BYTES or more is only measured
    (hashed, not written): the load makes its bytes again from its trees, which stay until then, and the
    store never holds it (it would drop it right after the load anyway).
    """
    from concurrent.futures import ThreadPoolExecutor

    if not missing:
        return {}
    sizes = {group.key: sum(tree_size(tree) for tree, _ in trees) for group, trees in missing}
    lock = threading.Lock()
    written: dict[str, Layer] = {}
    with ctx.ui.progress(f"writing environment layers ({len(missing)})", total=sum(sizes.values()),
                         unit="bytes") as task:
        def advance(n: int) -> None:
            with lock:
                task.advance(n)

        def write(item: tuple[Group, list[tuple[Path, str]]]) -> None:
            group, trees = item
            if send and sizes[group.key] >= RELEASE_BYTES:
                layer = measure_layer(trees, store.layers / "measured", progress=advance)
                layer.path = store.layer_path(layer.diff_id)
                store.record_sent(group.key, layer)
                written[group.key] = layer
                _SENT[layer.diff_id] = layer
                return
            written[group.key] = store.put_group(group.key, trees, progress=advance)
            for tree, _ in trees:
                shutil.rmtree(tree, ignore_errors=True)

        with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2))) as pool:
            list(pool.map(write, sorted(missing, key=lambda item: -sizes[item[0].key])))
    return written


def _staged_files(store: LayerStore, unit: Unit, stage: Path) -> dict:
    """The RECORD rows the split left for `unit`, checked against its first install's RECORD, then kept.

    The split checks every file against its RECORD; the RECORD itself (no hash of its own) must be the
    one this unit's first install recorded (same unit key: same wheel, installer, Python, prefix).
    """
    data = json.loads((stage / f"files-{unit.key}.json").read_text())
    pinned = store.dist(unit.key).get("record")
    if pinned and pinned != data["record"]:
        raise EnvmgrError(f"{unit.name}: its installed RECORD differs from the one its first install left "
                          f"({data['record'][:19]}, was {str(pinned)[:19]}): a modified file in the uv cache?",
                          hint="remove the uv cache (`<cache>/uv`) and build again; nothing was stored or tagged")
    data["elf"] = elf_facts(stage / f"d-{unit.key}", [path for path, _digest, _size in data["files"]])
    store.put_unit_files(unit.key, data)
    return data


def elf_facts(tree: Path, paths_: Iterable[str]) -> dict[str, list]:
    """path in the prefix -> [DT_NEEDED, DT_SONAME, RPATH/RUNPATH] of each shared object among `paths_` in `tree`
    (read here, as bytes: nothing runs), for the system-library check from records (sonames.lacking_from_records).
    A file another distribution's layer holds is not in this tree: its owner's facts have it."""
    from envmgr.build.elf_needed import dynamic_info

    found: dict[str, list] = {}
    for inner in paths_:
        if ".so" not in inner.rsplit("/", 1)[-1]:
            continue
        path = tree / inner
        if path.is_symlink() or not path.is_file():
            continue
        info = dynamic_info(str(path))
        if info is not None:
            found[inner] = [info[0], info[1], info[2]]
    return found


def _say_shared(ctx: Context, shared: Shared) -> None:
    """Name the files several distributions install (in the log), and warn when their contents differ."""
    if not shared.owners:
        return
    differing = set(shared.differing())
    for path in sorted(shared.owners):
        names = ", ".join(sorted(shared.claims[path]))
        owner = shared.owners[path]
        if path in differing:
            ctx.ui.warn(f"{path} is installed by {names} with different contents: the image holds {owner}'s "
                        "(the first by name)")
        else:
            ctx.ui.log(f"shared file {path} ({names}, the same bytes): in {owner}'s layer only")
    ctx.ui.step(f"{len(shared.owners)} file(s) installed by more than one distribution: each in one layer "
                f"({len(differing)} with different contents)")


def _record_staged_sizes(store: LayerStore, todo: list[Unit], stage: Path, files: dict[str, dict]) -> None:
    """Each unit just staged, into the store: its size (its staged tree plus the shared files it left to
    another unit's layer: its whole install) and its RECORD."""
    dropped_bytes = shared_files(files).dropped_bytes
    for unit in todo:
        record = store.dist(unit.key)
        size = tree_size(stage / f"d-{unit.key}") + dropped_bytes.get(unit.key, 0)
        store.put_dist(unit.key, **{**record, "name": unit.name, "size": size,
                                    "record": files[unit.key]["record"]})


def _layers_for_plan(ctx: Context, store: LayerStore, method: str, plan: list[Group], stage: Path,
                 need_bytes: frozenset[str], send: bool) -> list[Layer]:
    """One layer per group of the plan, in its order: from the store when there, else written from the staged
    trees (all there: build_env_layers staged every group the store lacked)."""
    found_layers: dict[str, Layer] = {}
    missing: list[tuple[Group, list[tuple[Path, str]]]] = []
    for group in plan:
        layer = store.group(group.key, need_bytes)
        if layer is not None:
            found_layers[group.key] = _sent_layer(layer)
            continue
        names = [STAGE_SKELETON] if group.kind == "skeleton" else [u.key for u in group.members]
        trees = [(stage / f"d-{name}", PHYSICAL_PREFIX) for name in names]
        if not all(tree.is_dir() for tree, _ in trees):   # its layer left the store meanwhile
            raise EnvmgrError(f"{method}: environment layer {group.label} left the layer store during "
                              "the build (a concurrent gc?)", hint="run the build again")
        missing.append((group, trees))
    found_layers.update(_write_groups(ctx, store, missing, send=send))
    return [found_layers[group.key] for group in plan]


def _where_in_engine(known: list[tuple[str, ImageFacts]], wanted: dict[str, Unit]
                     ) -> dict[str, tuple[str, LayerFacts, UnitFacts]]:
    """unit key -> the first image (and its layer) whose layer-facts label lists that wanted unit."""
    found: dict[str, tuple[str, LayerFacts, UnitFacts]] = {}
    for image_id, facts in known:
        for layer in facts.layers:
            for unit in layer.units:
                if unit.key in wanted and unit.key not in found:
                    found[unit.key] = (image_id, layer, unit)
    return found


def _learn_unit(store: LayerStore, key: str, data: dict, unit: UnitFacts) -> None:
    """A distribution's RECORD rows (read from an image) and its label facts, into this store's records."""
    store.put_unit_files(key, data)
    dist: dict[str, object] = {"name": unit.name, "size": unit.size, "record": unit.record}
    if unit.gpu_archs is not None:
        dist["gpu_archs"] = list(unit.gpu_archs)
    store.put_dist(key, **dist)


def _record_layers_in_engine(ctx: Context, store: LayerStore, images: list) -> None:
    """The layers of the images learned from (the skeleton too) are in the engine: recorded as such, with their
    SBOM facts kept per diff ID."""
    from envmgr.build.layer_facts import keep_layer_facts, kept_layer_facts

    for facts in images:
        for layer in facts.layers:
            if layer.group and not store._group_record(layer.group).is_file():
                store.record_in_engine(layer.group, layer.diff_id, layer.size)
            if kept_layer_facts(ctx, layer.diff_id) is None:
                keep_layer_facts(ctx, layer.diff_id, layer.sbom)


def learn_from_engine(ctx: Context, store: LayerStore, base: BaseImage, method: str, dists: list[Unit]) -> list[str]:
    """Fill the store's records of distributions (and layers) it has never seen from the images the engine
    holds (their layer-facts label, issue 26): a new cache, a second base dir, a server that imported an
    archive installs nothing the engine already has. Returns the names learned.

    Each distribution's RECORD rows (which paths it shares with others) are read from the image itself, one
    container per image, and must hash to what the label says; a distribution that does not is installed.
    """
    from envmgr.build import layer_facts

    wanted = {u.key: u for u in dists if store.unit_files(u.key) is None or "size" not in store.dist(u.key)}
    if not wanted:
        return []
    known = layer_facts.in_engine(ctx)
    if not known:
        return []
    found = _where_in_engine(known, wanted)
    learned: list[str] = []
    used: set[str] = set()
    by_image: dict[str, list[tuple[LayerFacts, UnitFacts]]] = {}
    for _key, (image_id, layer, unit) in sorted(found.items()):
        by_image.setdefault(image_id, []).append((layer, unit))
    facts_of = dict(known)
    for image_id, pairs in sorted(by_image.items()):
        # the image's other distributions too (same container): a later copy out of this image needs to know
        # which shared files each of them owns there (regain_from_engine), without a second container
        others = [(layer, unit) for layer in facts_of[image_id].layers for unit in layer.units
                  if unit.key not in wanted and store.unit_files(unit.key) is None]
        units = {unit.key: unit for _layer, unit in pairs + others}
        for key, data in _records_from_image(ctx, image_id, base, method, pairs + others).items():
            _learn_unit(store, key, data, units[key])
            if key in wanted:
                learned.append(units[key].name)
                used.add(image_id)
    _record_layers_in_engine(ctx, store, [facts for image_id, facts in known if image_id in used])
    if learned:
        ctx.ui.step(f"{len(learned)} distribution(s) this cache had not seen are in the engine's images: "
                    "their layers are reused, not installed")
    return sorted(learned)


# Runs in an engine image with its base's interpreter (-S -I): copies each listed unit's files (and the
# bytecode compiled for its sources) out of the image into /out/d-<unit key>, as the split left them.
REGAIN_SCRIPT = r"""
import json, os, shutil, sys
os.umask(0o022)
plan = json.load(open(sys.argv[1]))
prefix, out, site = plan["prefix"], plan["out"], plan["site"]
tag = sys.implementation.cache_tag
for key, inners in sorted(plan["units"].items()):
    root = os.path.join(out, "d-" + key)
    for inner in inners:
        pairs = [(os.path.join(prefix, inner), os.path.join(root, inner))]
        if inner.endswith(".py") and inner.startswith(site + "/") and "__pycache__" not in inner.split("/"):
            folder, name = os.path.split(inner)
            pyc = os.path.join(folder, "__pycache__", name[:-3] + "." + tag + ".pyc")
            if os.path.isfile(os.path.join(prefix, pyc)):
                pairs.append((os.path.join(prefix, pyc), os.path.join(root, pyc)))
        for source, target in pairs:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copyfile(source, target)
            os.chmod(target, os.stat(source).st_mode & 0o7777)
print("ENVMGR-REGAINED", flush=True)
"""


def _site(base: BaseImage) -> str:
    return f"{PHYSICAL_PREFIX}/lib/python{'.'.join((base.python_version or '').split('.')[:2])}/site-packages"


def _records_from_image(ctx: Context, image_id: str, base: BaseImage, method: str,
                        wanted: list[tuple[LayerFacts, UnitFacts]]) -> dict[str, dict]:
    """unit key -> its RECORD rows ({"name", "record", "files"}, as the split leaves them), read from the
    engine's image for each (LayerFacts, UnitFacts) in `wanted`; only those whose RECORD hashes to what the
    label names."""
    from envmgr.build import layer_facts

    site = _site(base)
    where = {}
    for layer, unit in wanted:
        info = layer_facts.dist_info_of(layer, unit.name)
        if info is not None:
            where[unit.key] = (unit, f"{site}/{info}/RECORD")
    if not where:
        return {}
    records, elf = layer_facts.read_image_records(ctx, image_id, base.python,
                                                  [path for _u, path in where.values()], site, PHYSICAL_PREFIX, method)
    found: dict[str, dict] = {}
    for key, (unit, path) in where.items():
        data = records.get(path)
        if data is None or layer_facts.record_hash(data) != unit.record:
            ctx.ui.log(f"{unit.name}: the RECORD in image {image_id[:19]} is not the one its label names")
            continue
        try:
            found[key] = {"name": unit.name, "record": unit.record,
                          "files": layer_facts.record_files(data, site, PHYSICAL_PREFIX)}
        except (ValueError, UnicodeDecodeError):
            continue
        if path in elf:
            found[key]["elf"] = elf[path]
    return found


def _regain_sources(known: list, todo: dict[str, Unit]) -> dict[str, tuple[str, Any, Any]]:
    """diff ID -> (image, its facts, the layer) of an environment layer in the engine that holds a unit of
    `todo` (one layer per unit: the first image that lists it)."""
    sources: dict[str, tuple[str, Any, Any]] = {}
    covered: set[str] = set()
    for key in sorted(todo):
        if key in covered:
            continue
        for image_id, facts in known:
            layer = next((la for la in facts.layers if any(x.key == key for x in la.units)), None)
            if layer is not None:
                sources.setdefault(layer.diff_id, (image_id, facts, layer))
                covered.update(x.key for x in layer.units)
                break
    return sources


def regain_from_engine(ctx: Context, store: LayerStore, base: BaseImage, method: str, wanted: list[Unit],
                       files: dict[str, dict], stage: Path) -> set[str]:
    """Trees of the distributions `wanted` (whose layers this store lacks the bytes of) copied out of an engine
    image, instead of installing them again: each from an environment layer of an image that holds it (the
    layer it had there, its other distributions too), kept only when the trees of that layer make its
    recorded diff ID byte for byte, and when the distribution leaves out the same shared files here as there.
    The rest is left to the install. Returns the unit keys regained (trees in `stage/d-<key>`)."""
    from envmgr.build import layer_facts

    todo = {u.key: u for u in wanted if u.key in files}
    if not todo:
        return set()
    sources = _regain_sources(layer_facts.in_engine(ctx), todo)
    if not sources:
        return set()
    regained: set[str] = set()
    by_image: dict[str, list[str]] = {}
    for diff_id, (image_id, _facts, _layer) in sorted(sources.items()):
        by_image.setdefault(image_id, []).append(diff_id)
    started = time.monotonic()
    for image_id, diff_ids in sorted(by_image.items()):
        regained |= _regain_from_image(ctx, store, base, method, image_id, diff_ids, sources, files, stage,
                                       todo, regained)
    ctx.ui.log(f"{len(regained)} of {len(todo)} distributions copied out of the engine's images in "
               f"{time.monotonic() - started:.1f} s")
    return regained


def _regain_from_image(ctx: Context, store: LayerStore, base: BaseImage, method: str, image_id: str,
                       diff_ids: list[str], sources: dict[str, tuple[str, Any, Any]], files: dict[str, dict],
                       stage: Path, todo: dict[str, Unit], regained: set[str]) -> set[str]:
    """The layers `diff_ids` of one engine image copied out into `stage` (one container); the units of `todo`
    whose trees make their layer's diff ID and leave out the same shared files as here."""
    from envmgr.door.containers import BindMount, ContainerSpec

    facts = sources[diff_ids[0]][1]
    # the RECORD rows of every distribution of that image: who owned which shared file there
    there: dict[str, dict] = {}
    unknown = []
    for layer in facts.layers:
        for unit in layer.units:
            data = files.get(unit.key) or store.unit_files(unit.key)
            if data is not None:
                there[unit.key] = data
            else:
                unknown.append((layer, unit))
    there.update(_records_from_image(ctx, image_id, base, method, unknown))
    if len(there) != sum(len(layer.units) for layer in facts.layers):
        return set()
    here_owners = shared_files(files).owners
    there_owners = shared_files(there).owners
    found: set[str] = set()
    plan = {unit.key: [path for path, _digest, _size in there[unit.key]["files"]
                       if there_owners.get(path, unit.name) == unit.name]
            for diff_id in diff_ids for unit in sources[diff_id][2].units}
    plan_file = stage / ".regain.json"
    plan_file.write_text(json.dumps({"prefix": PHYSICAL_PREFIX, "out": "/out", "units": plan,
                                     "site": os.path.relpath(_site(base), PHYSICAL_PREFIX)}))
    lines: list[str] = []
    container = ContainerSpec(
        image=image_id, command=[base.python, "-S", "-I", "-B", "-c", REGAIN_SCRIPT, "/out/.regain.json"],
        env={"PATH": "/usr/bin:/bin"}, mounts=[BindMount(stage, "/out", read_only=False)],
        user=f"{os.getuid()}:{os.getgid()}", network="none",
        labels={paths.LABEL_KIND: "step", paths.LABEL_METHOD: method}).hardened()
    with ctx.ui.progress(f"copying {len(plan)} distributions' files out of the engine's image "
                         f"({len(diff_ids)} layer(s) it holds)", total=None, unit="files"):
        code = ctx.engine.run(container, on_line=lines.append).exit_code
    plan_file.unlink(missing_ok=True)
    for diff_id in diff_ids:
        layer = sources[diff_id][2]
        trees = [(stage / f"d-{unit.key}", PHYSICAL_PREFIX) for unit in layer.units]
        same = code == 0 and all(tree.is_dir() for tree, _ in trees) and \
            measure_layer(trees, stage / ".measured").diff_id == diff_id
        for unit in layer.units:
            mine = unit.key in todo and unit.key not in regained and unit.key not in found and same and [
                path for path, _digest, _size in files[unit.key]["files"]
                if here_owners.get(path, unit.name) == unit.name] == plan[unit.key]
            if mine:
                found.add(unit.key)
            elif unit.key not in regained and unit.key not in found:
                shutil.rmtree(stage / f"d-{unit.key}", ignore_errors=True)
        if not same:
            ctx.ui.log(f"layer {diff_id[:19]} copied out of image {image_id[:19]} does not make its bytes "
                       f"(exit {code}{': ' + ' | '.join(lines[-3:]) if code else ''}): installing instead")
    return found


def build_env_layers(ctx: Context, method: str, base: BaseImage, entries: list[str], extra_indexes: list[str],
                     layout: str, installer: str, uv: str, has_torch: bool,
                     need_bytes: frozenset[str] = frozenset(),
                     defer: contextlib.ExitStack | None = None) -> EnvLayers:
    """The environment's layers from the store, installing only the distributions a missing layer needs.

    A layer whose bytes went to the engine counts as there, unless its diff ID is in `need_bytes`.
    `defer`: the build's exit stack, when it loads the image next: new large layers are then measured,
    not written, and their staging trees stay until the stack closes (see _write_groups).
    """
    store = store_for(ctx)
    python_version = base.python_version or ""
    dists = units(entries, python_version, installer, layout)
    skeleton = Group("skeleton", "skeleton", (), skeleton_key(python_version, uv, layout))
    torch = next((u for u in dists if u.name == "torch"), None)
    stage_root = ctx.cache_dir / "envs"
    stage_root.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=stage_root, prefix=f"{method}-units-"))
    staged: set[str] = set()
    kept_for_load = False
    skeleton_staged = False
    archs: list[str] | None = None
    files: dict[str, dict] = {}   # unit key -> its RECORD rows (store.unit_files): who shares which file
    # only a build that loads the image next learns from the engine (the layers it learns have no bytes here)
    learned = learn_from_engine(ctx, store, base, method, dists) if defer is not None else []
    regained: set[str] = set()    # unit keys whose trees were copied out of an engine image (regain_from_engine)
    try:
        while True:
            files.update({u.key: known for u in dists if u.key not in files
                          for known in [store.unit_files(u.key)] if known is not None})
            sizes = {u.key: store.dist(u.key).get("size") if u.key in files else None for u in dists}
            groups = plan_groups(dists, sizes, layout, dropped=shared_files(files).digests())
            need: dict[str, Unit] = {u.key: u for u in dists if sizes[u.key] is None}
            lacking = [g for g in groups if store.group(g.key, need_bytes) is None]
            if need_bytes or learned:   # what the engine's images hold: copied out of them, not installed
                regained |= regain_from_engine(ctx, store, base, method, [
                    u for g in lacking for u in g.members if u.key not in staged and u.key not in regained
                    and sizes[u.key] is not None], files, stage)
            for group in lacking:
                need.update({u.key: u for u in group.members if u.key not in regained})
            want_skeleton = not skeleton_staged and store.group(skeleton.key, need_bytes) is None
            want_archs = False
            if has_torch and torch is not None and "gpu_archs" not in store.dist(torch.key):
                want_archs = True
                need.update({u.key: u for u in dists})
            todo = [u for key, u in sorted(need.items()) if key not in staged]
            if not todo and not want_skeleton:
                break
            here = {u.key for u in todo}
            others = [(data["name"], path, digest) for key, data in sorted(files.items()) if key not in here
                      for path, digest, _size in data["files"]]
            found = stage_units(ctx, base, method, todo, stage, extra_indexes, want_skeleton, want_archs, others)
            skeleton_staged = skeleton_staged or want_skeleton
            for unit in todo:
                files[unit.key] = _staged_files(store, unit, stage)
            _record_staged_sizes(store, todo, stage, files)
            staged.update(u.key for u in todo)
            if want_archs and torch is not None:
                archs = found or []
                store.put_dist(torch.key, **{**store.dist(torch.key), "gpu_archs": archs})
        _say_shared(ctx, shared_files(files))
        plan = [skeleton, *groups]
        layers = _layers_for_plan(ctx, store, method, plan, stage, need_bytes, send=defer is not None)
        labels = [group.label for group in plan]
        if torch is not None and has_torch:
            archs = store.dist(torch.key).get("gpu_archs", archs or [])
        ctx.ui.step(f"environment: {len(layers)} layers, {len(staged)} of {len(dists)} distributions installed "
                    "now, the rest from the layer store", installed=sorted(u.name for u in dists if u.key in staged),
                    learned=learned)
        groups_facts: list[tuple[str | None, list[UnitFacts]]] = [(skeleton.key, [])]
        for group in groups:
            members = []
            for unit in group.members:
                record = store.dist(unit.key)
                members.append(UnitFacts(key=unit.key, name=unit.name, size=int(record["size"]),
                                         record=str(files[unit.key]["record"]),
                                         gpu_archs=list(record.get("gpu_archs") or [])
                                         if has_torch and torch is not None and unit.key == torch.key else None))
            groups_facts.append((group.key, members))
        result = EnvLayers(layers, labels, archs if has_torch else [], sorted(u.name for u in dists
                                                                              if u.key in staged),
                           groups=groups_facts, learned=learned)
        sent = [layer for layer in layers if layer.trees]
        if sent:
            ctx.ui.step(f"{len(sent)} large environment layer(s) ({sum(la.size for la in sent) / 1e9:.1f} GB) go "
                        "straight into the engine: the layer store keeps no copy")
        if defer is not None and sent:
            defer.callback(shutil.rmtree, stage, ignore_errors=True)   # after the load has read them
            for layer in sent:
                defer.callback(_SENT.pop, layer.diff_id, None)
            kept_for_load = True
        return result
    finally:
        if not kept_for_load:
            shutil.rmtree(stage, ignore_errors=True)
