"""Disk use per method, for `envmgr gc --dry-run` and `envmgr doctor`.

Images: the layers of the method's images (current and superseded) counted once each, from the
engine's image history; "its own" are those no other method's or base image has (what removing all of
them frees), "shared" the rest (the base layer, an environment another method also uses). Cached layers: envmgr's
layer files in cache_dir/layers for the method (its environment and method layers, and the system
layer its spec names). Runs: everything under <base>/runs/<method> (outputs, logs, per-run copies).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from envmgr.core import paths
from envmgr.core.spec import MethodSpec, list_methods
from envmgr.door.context import Context
from envmgr.images.base import current_base

_LAYER = re.compile(r"^(env|method)-(.+)-[0-9a-f]{32}\.(tar|json)$")


@dataclass
class MethodDisk:
    method: str
    images: int = 0            # method images in the engine (current and superseded)
    image_bytes: int = 0       # their sizes, as the engine counts them
    unique_bytes: int = 0      # of those, what no other image shares
    shared_bytes: int = 0      # shared with other images (the base layer, an environment layer)
    layer_bytes: int = 0       # envmgr's cached layer files for the method
    runs: int = 0
    runs_bytes: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def tree_bytes(root: Path) -> int:
    """Bytes of the files under `root` (links not followed, each inode once)."""
    total, seen = 0, set()
    for folder, _, files in os.walk(root):
        for name in files:
            try:
                st = os.lstat(os.path.join(folder, name))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def usage(ctx: Context, only: set[str] | None = None) -> list[MethodDisk]:
    specs = [s for s in list_methods(ctx.config.base_dir) if not only or s.name in only]
    found = {spec.name: MethodDisk(spec.name) for spec in specs}
    try:
        _count_images(ctx, found)
    except Exception:  # noqa: BLE001 - no engine (or one that cannot say): the cache and the runs still count
        pass
    layers = ctx.cache_dir / "layers"
    if layers.is_dir():
        system_files = _system_layer_files(ctx, specs)
        for path in layers.iterdir():
            match = _LAYER.match(path.name)
            owner = match.group(2) if match else None
            owners = [owner] if owner in found else system_files.get(path.name, [])
            for name in owners:
                found[name].layer_bytes += path.lstat().st_size
    runs_root = ctx.config.base_dir / "runs"
    for name, entry in found.items():
        folder = runs_root / name
        if folder.is_dir() and not folder.is_symlink():
            entry.runs = sum(1 for p in folder.iterdir() if p.is_dir())
            entry.runs_bytes = tree_bytes(folder)
    return [found[name] for name in sorted(found)]


def _count_images(ctx: Context, found: dict[str, MethodDisk]) -> None:
    """Each method's images as the set of their layers: a layer counts once per method, as its own when no
    image of another method (or a base image) has it, as shared otherwise."""
    chains: dict[str, dict[str, int]] = {}       # method ("" for any other image) -> layer chain -> size
    figures = {i["Id"]: i for i in ctx.engine.image_disk_usage()}
    for image in ctx.engine.images():
        method = (image.get("Labels") or {}).get(paths.LABEL_METHOD, "")
        owner = method if method in found else ""
        if owner:
            found[owner].images += 1
        layers = image_layers(ctx, image["Id"])
        if layers is None:     # the engine's own figure for this image alone
            figure = figures.get(image["Id"], image)
            layers = [(f"{image['Id']}-own", max(0, int(figure.get("Size") or 0)
                                                 - max(0, int(figure.get("SharedSize") or 0))))]
        chains.setdefault(owner, {}).update(layers)
    for name, entry in found.items():
        others = {c for owner, sizes in chains.items() if owner != name for c in sizes}
        for chain, size in chains.get(name, {}).items():
            entry.image_bytes += size
            if chain in others:
                entry.shared_bytes += size
            else:
                entry.unique_bytes += size


def _system_layer_files(ctx: Context, specs: list[MethodSpec]) -> dict[str, list[str]]:
    """system layer file name -> the methods whose spec names it (methods with the same list share it)."""
    from envmgr.build.system_layer import system_key

    owners: dict[str, list[str]] = {}
    for spec in specs:
        if not spec.system.apt:
            continue
        base = current_base(ctx, spec.base_image)
        if base is None:
            continue
        key = system_key(spec, base)[:32]
        for suffix in (".tar", ".json"):
            owners.setdefault(f"system-{key}{suffix}", []).append(spec.name)
    return owners


def describe(entry: MethodDisk) -> str:
    """One line: `sd-demo: 2 images 9.1 GB (3.2 GB its own, 5.9 GB shared), cached layers 6.0 GB, 4 runs 1.2 GB`."""
    def gb(n: int) -> str:
        return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"

    return (f"{entry.method}: {entry.images} image{'' if entry.images == 1 else 's'} {gb(entry.image_bytes)} "
            f"({gb(entry.unique_bytes)} its own, {gb(entry.shared_bytes)} shared), cached layers "
            f"{gb(entry.layer_bytes)}, {entry.runs} run{'' if entry.runs == 1 else 's'} {gb(entry.runs_bytes)}")


def image_layers(ctx: Context, image_id: str) -> list[tuple[str, int]] | None:
    """(chain, size) of each layer, oldest first; None when the history does not map onto the layers."""
    info = ctx.engine.inspect_image(image_id) or {}
    diff_ids = (info.get("RootFS") or {}).get("Layers") or []
    newest_first = ctx.engine.image_history(image_id)
    if newest_first is None:
        return None
    history = list(reversed(newest_first))
    if len(history) != len(diff_ids):
        return None
    chain = hashlib.sha256()
    found = []
    for diff_id, entry in zip(diff_ids, history, strict=True):
        chain.update(diff_id.encode())  # a layer is shared only with the same layers below it
        found.append((chain.hexdigest(), int(entry.get("Size") or 0)))
    return found
