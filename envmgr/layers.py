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

from . import paths
from .base import BaseImage
from .containers import BindMount
from .context import Context
from .errors import EnvmgrError
from .files import atomic_write
from .image import Layer, file_sha256, measure_layer, write_layer
from .uv_cache import lend_uv_cache

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


def split_requirements(text: str) -> list[str]:
    """A hashed requirements file cut into one entry per distribution (continuation lines kept together)."""
    entries: list[str] = []
    current: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or (stripped.startswith("#") and not current):
            continue
        if stripped.startswith("#"):
            continue
        if not current and stripped.startswith("-"):
            continue   # options (--index-url etc.) never reach a lock envmgr writes; ignore them here
        current.append(line)
        if not stripped.endswith("\\"):
            entries.append("\n".join(current))
            current = []
    if current:
        entries.append("\n".join(current))
    return entries


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


def plan_groups(dists: list[Unit], sizes: dict[str, int | None], layout: str, *, big: int = BIG_BYTES,
                buckets: int = BUCKETS, budget: int = MAX_ENV_LAYERS) -> list[Group]:
    """The distribution layers, bottom first: big ones by size (largest lowest), then the buckets.

    Largest lowest: a layer is shared in the engine only when every layer below it is too (its chain
    ID), so the layers most costly to keep twice (torch, the CUDA libraries) sit where methods with the
    same torch still agree. A distribution of unknown size counts as small (it is installed anyway).
    """
    def size(unit: Unit) -> int:
        return sizes.get(unit.key) or 0

    bigs = [u for u in dists if size(u) >= big]
    room = max(0, budget - 1 - buckets)   # the skeleton, then the buckets
    bigs.sort(key=lambda u: (-size(u), u.name))
    bigs = bigs[:room]                     # past the budget, the smallest big ones join their buckets
    big_names = {u.name for u in bigs}
    groups = [Group("big", u.name, (u,), _digest({"layout": layout, "kind": "big", "members": [u.key]}))
              for u in bigs]
    by_bucket: dict[int, list[Unit]] = {}
    for unit in dists:
        if unit.name not in big_names:
            by_bucket.setdefault(bucket_of(unit.name, buckets), []).append(unit)
    for index in sorted(by_bucket):
        members = tuple(sorted(by_bucket[index], key=lambda u: u.name))
        groups.append(Group("bucket", f"bucket-{index:02d}", members,
                            _digest({"layout": layout, "kind": "bucket", "members": sorted(u.key for u in members)})))
    return groups


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


ARCH_MARK = "ENVMGR-GPU-FACTS "


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


SPLIT_SCRIPT = r"""
import csv, os, re, sys
prefix, envs, units_file, skeleton_file, plan_file = sys.argv[1:6]
normal = lambda name: re.sub(r"[-_.]+", "-", name).lower()
keys = dict(reversed(line.split()) for line in open(units_file) if line.strip())
skeleton = {line.strip()[2:] for line in open(skeleton_file) if line.strip()}
lib = os.path.join(prefix, "lib")
site = [os.path.join(lib, d, "site-packages") for d in os.listdir(lib) if d.startswith("python")][0]
for entry in sorted(os.listdir(site)):
    if not entry.endswith(".dist-info"):
        continue
    info = os.path.join(site, entry)
    name = next(line.split(":", 1)[1].strip() for line in open(os.path.join(info, "METADATA"), encoding="utf-8")
                if line.lower().startswith("name:"))
    key = keys.pop(normal(name))
    with open(os.path.join(info, "RECORD"), newline="", encoding="utf-8") as fh:
        rows = [row[0] for row in csv.reader(fh) if row]
    in_site = []
    for rel in rows:
        source = os.path.normpath(os.path.join(site, rel))
        inner = os.path.relpath(source, prefix)
        if inner.startswith(".."):
            sys.exit(f"{entry}: RECORD names a file outside the environment: {rel}")
        target = os.path.join(envs, "d-" + key, inner)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.rename(source, target)
        if os.path.isfile(target) and not os.path.relpath(source, site).startswith(".."):
            in_site.append(os.path.relpath(source, site))
    unit_site = os.path.join(envs, "d-" + key, os.path.relpath(site, prefix))
    plans.append((unit_site, key, bytecode_chunks(bytecode_sources(in_site))))
if keys:
    sys.exit("installed without a dist-info: " + " ".join(sorted(keys)))
if os.path.exists(os.path.join(prefix, ".lock")):
    os.remove(os.path.join(prefix, ".lock"))   # uv's own install-time lock file: in no layer
left = [os.path.relpath(os.path.join(d, f), prefix) for d, _, files in os.walk(prefix) for f in files]
left = sorted(p for p in left if p not in skeleton)
if left:
    sys.exit("files no RECORD names (cannot be given to a distribution's layer): " + " ".join(left[:10]))
lists = os.path.dirname(plan_file)
with open(plan_file, "w") as plan:
    for unit_site, key, chunks in sorted(plans, key=lambda plan: -len(plan[2])):   # the longest work first
        for index, chunk in enumerate(chunks):
            listing = os.path.join(lists, f"{key}-{index:04d}.txt")
            with open(listing, "w", encoding="utf-8") as fh:
                fh.write("".join(rel + "\n" for rel in chunk))
            plan.write(f"{unit_site} {listing}\n")
"""
SPLIT_SCRIPT = (f"from __future__ import annotations\nCOMPILE_CHUNK_FILES = {COMPILE_CHUNK_FILES}\n"
                + _source_of(bytecode_sources, bytecode_chunks) + "\nplans = []\n" + SPLIT_SCRIPT)


def _install_script(python: str, want_skeleton: bool, read_archs: bool) -> str:
    """Install every listed unit in one container, then give each distribution its own tree.

    One `uv pip install` of all the units (uv installs each wheel on its own, in parallel) into the
    prefix, hard-linking from its cache when the cache is lent to the stage (envmgr.uv_cache); then
    each distribution's files, as its RECORD names them, are renamed into stage/d-<key> (the staging
    folder is mounted at the prefix's parent: renames, not copies), and its bytecode is compiled
    there by fresh interpreters that load only the standard library (-S), each given a fixed run of
    COMPILE_CHUNK_FILES of the unit's sources, so a unit's bytes depend on the unit alone, whatever
    the machine's core count. Nothing writes into an installed file: renames, and new pyc files
    (compileall writes a temporary file and renames it), so the cache's linked files stay intact.
    A file no RECORD names stops the build, except uv's empty install-time `.lock`, which no layer
    holds (a single install leaves it in the prefix). A source that does not compile stays without
    a pyc, as in a single install.
    """
    uv, work, envs, prefix = paths.CONTAINER_UV, paths.CONTAINER_WORK, paths.CONTAINER_ENVS_ROOT, PHYSICAL_PREFIX
    compile_one = (f'cd "$1" && exec env PYTHONHASHSEED=0 {python} -S -B -m compileall -f -q '
                   f'--invalidation-mode unchecked-hash -i "$2" >/dev/null')
    lines = [
        f"rm -rf {prefix}",
        f"{uv} venv --quiet --python {python} {prefix}",
        f"(cd {prefix} && find . ! -type d | LC_ALL=C sort) > /tmp/skeleton-files",
    ]
    if want_skeleton:
        lines.append(f"cp -a {prefix} {envs}/d-{STAGE_SKELETON}")
    lines += [
        f"if [ -s {work}/requirements.txt ]; then",
        f"  {uv} pip install --python {prefix}/bin/python --require-hashes --no-deps -r {work}/requirements.txt",
        "fi",
        "echo ENVMGR-PHASE installed",
    ]
    if read_archs:   # torch imports only in a whole environment: read it before the split, writing no pyc
        lines += [f"CUDA_VISIBLE_DEVICES= PYTHONDONTWRITEBYTECODE=1 {prefix}/bin/python -B {work}/archs.py "
                  f"|| echo '{ARCH_MARK}[]'", "echo ENVMGR-PHASE gpu-facts"]
    lines += [
        "mkdir -p /tmp/bytecode",
        f"{python} -S -B {work}/split.py {prefix} {envs} {work}/units.txt /tmp/skeleton-files /tmp/bytecode/plan",
        "echo ENVMGR-PHASE split",
        f"xargs -r -n 2 -P \"$(nproc)\" sh -c '{compile_one}' compile < /tmp/bytecode/plan || true",
        "echo ENVMGR-PHASE compiled",
        f"rm -rf {prefix}",
    ]
    return "\n".join(lines)


def stage_units(ctx: Context, base: BaseImage, method: str, todo: list[Unit], stage: Path,
                extra_indexes: list[str], want_skeleton: bool, read_archs: bool) -> list[str] | None:
    """Install `todo` into `stage/d-<key>` (and the skeleton into stage/d-skeleton) in one container step.

    Returns torch's GPU architectures when `read_archs`, else None.
    """
    from .backends.common import run_step, uv_mounts, uv_step_env
    from .gpu_image import ARCH_SCRIPT

    work_root = ctx.cache_dir / "work"
    work_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work_root, prefix=f"units-{method}-") as work:
        (Path(work) / "requirements.txt").write_text("".join(u.requirement + "\n" for u in todo))
        (Path(work) / "units.txt").write_text("".join(f"{u.key} {u.name}\n" for u in todo))
        (Path(work) / "split.py").write_text(SPLIT_SCRIPT)
        (Path(work) / "archs.py").write_text(ARCH_SCRIPT.replace("ENVMGR-GPU-FACTS ", ARCH_MARK))
        script = _install_script(base.python, want_skeleton, read_archs)
        lines: list[str] = []
        started = time.monotonic()
        with ctx.ui.progress(f"installing {len(todo)} distributions, one layer unit each", total=len(todo),
                             unit="packages") as task:
            def on_line(line: str) -> None:
                lines.append(line)
                if line.strip().startswith("+ "):
                    task.advance(1)
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
                run_step(ctx, base, f"installing {method}'s environment", script, mounts, env, on_line=on_line,
                         method=method)
    if not read_archs:
        return None
    found = [line[len(ARCH_MARK):] for line in lines if line.startswith(ARCH_MARK)]
    return list(json.loads(found[-1])) if found else []


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
                return
            written[group.key] = store.put_group(group.key, trees, progress=advance)
            for tree, _ in trees:
                shutil.rmtree(tree, ignore_errors=True)

        with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2))) as pool:
            list(pool.map(write, sorted(missing, key=lambda item: -sizes[item[0].key])))
    return written


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
    try:
        while True:
            sizes = {u.key: store.dist(u.key).get("size") for u in dists}
            groups = plan_groups(dists, sizes, layout)
            need: dict[str, Unit] = {u.key: u for u in dists if sizes[u.key] is None}
            for group in groups:
                if store.group(group.key, need_bytes) is None:
                    need.update({u.key: u for u in group.members})
            want_skeleton = not skeleton_staged and store.group(skeleton.key, need_bytes) is None
            want_archs = False
            if has_torch and torch is not None and "gpu_archs" not in store.dist(torch.key):
                want_archs = True
                need.update({u.key: u for u in dists})
            todo = [u for key, u in sorted(need.items()) if key not in staged]
            if not todo and not want_skeleton:
                break
            found = stage_units(ctx, base, method, todo, stage, extra_indexes, want_skeleton, want_archs)
            skeleton_staged = skeleton_staged or want_skeleton
            for unit in todo:
                staged.add(unit.key)
                record = store.dist(unit.key)
                store.put_dist(unit.key, **{**record, "name": unit.name, "size": tree_size(stage / f"d-{unit.key}")})
            if want_archs and torch is not None:
                archs = found or []
                store.put_dist(torch.key, **{**store.dist(torch.key), "gpu_archs": archs})
        plan = [skeleton, *groups]
        found_layers: dict[str, Layer] = {}
        missing: list[tuple[Group, list[tuple[Path, str]]]] = []
        for group in plan:
            layer = store.group(group.key, need_bytes)
            if layer is not None:
                found_layers[group.key] = layer
                continue
            names = [STAGE_SKELETON] if group.kind == "skeleton" else [u.key for u in group.members]
            trees = [(stage / f"d-{name}", PHYSICAL_PREFIX) for name in names]
            if not all(tree.is_dir() for tree, _ in trees):   # its layer left the store meanwhile
                raise EnvmgrError(f"{method}: environment layer {group.label} left the layer store during "
                                  "the build (a concurrent gc?)", hint="run the build again")
            missing.append((group, trees))
        found_layers.update(_write_groups(ctx, store, missing, send=defer is not None))
        layers = [found_layers[group.key] for group in plan]
        labels = [group.label for group in plan]
        if torch is not None and has_torch:
            archs = store.dist(torch.key).get("gpu_archs", archs or [])
        ctx.ui.step(f"environment: {len(layers)} layers, {len(staged)} of {len(dists)} distributions installed "
                    "now, the rest from the layer store")
        result = EnvLayers(layers, labels, archs if has_torch else [], sorted(u.name for u in dists
                                                                              if u.key in staged))
        sent = [layer for layer in layers if layer.trees]
        if sent:
            ctx.ui.step(f"{len(sent)} large environment layer(s) ({sum(la.size for la in sent) / 1e9:.1f} GB) go "
                        "straight into the engine: the layer store keeps no copy")
        if defer is not None and sent:
            defer.callback(shutil.rmtree, stage, ignore_errors=True)   # after the load has read them
            kept_for_load = True
        return result
    finally:
        if not kept_for_load:
            shutil.rmtree(stage, ignore_errors=True)
