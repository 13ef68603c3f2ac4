"""What a layer holds, for an SBOM and the layer-facts label: Python distributions (dist-info METADATA and
RECORD), conda packages (conda-meta) and Debian packages (dpkg status), read from a layer's tar or the
trees it is written from, kept per diff ID in the cache (layer_facts), taken from an engine image's label
when a layer has no bytes here, else read back from the engine (layer_bytes). sbom.py turns them into
components; target.py records them in the image's labels."""

from __future__ import annotations

import email.parser
import hashlib
import json
import re
import tarfile
from pathlib import Path

from envmgr.build.layer_facts import SBOM_DIR, keep_layer_facts, kept_layer_facts
from envmgr.door.context import Context
from envmgr.images.image import ImageConfig, Layer

_DIST_INFO = re.compile(r"/site-packages/([^/]+)\.dist-info/(METADATA|RECORD)$")


_CONDA_META = re.compile(r"/conda-meta/[^/]+\.json$")


def normal_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def layer_facts(path: Path) -> dict:
    """What an SBOM needs from one environment layer, read in one pass: each dist-info's name, version and
    RECORD sha256, and each conda-meta record's name, version, build, sha256 and subdir."""
    with tarfile.open(path, mode="r:") as tar:
        return _facts((info.name, lambda info=info: tar.extractfile(info).read())  # type: ignore[union-attr]
                      for info in tar if info.isfile())


def tree_layer_facts(trees) -> dict:
    """layer_facts of a measured layer, from the host trees its bytes are made of (no tar made)."""
    from envmgr.images.image import layer_entries

    return _facts((name, lambda item=item: Path(item).read_bytes())
                  for name, (kind, item) in sorted(layer_entries(trees).items()) if kind == "host"
                  and _wanted(name) and Path(item).is_file() and not Path(item).is_symlink())  # type: ignore[arg-type]


def _wanted(name: str) -> bool:
    return bool(_DIST_INFO.search(name) or _CONDA_META.search(name))


def _facts(files) -> dict:
    metadata: dict[str, list[str]] = {}
    records: dict[str, str] = {}
    conda: list[dict] = []
    for name, read in files:
        match = _DIST_INFO.search(name)
        if match:
            body = read()
            if match.group(2) == "RECORD":
                records[match.group(1)] = hashlib.sha256(body).hexdigest()
            else:
                headers = email.parser.BytesHeaderParser().parsebytes(body)
                metadata[match.group(1)] = [str(headers.get("Name", "")), str(headers.get("Version", ""))]
        elif _CONDA_META.search(name):
            try:
                record = json.loads(read())
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "name" in record:
                conda.append({k: record.get(k) for k in ("name", "version", "build", "sha256", "subdir")})
    return {"metadata": metadata, "records": records, "conda": conda}


def facts_of(layers: Path | list[Path] | list[dict]) -> list[dict]:
    items = layers if isinstance(layers, list) else [layers]
    return [item if isinstance(item, dict) else layer_facts(item) for item in items]


def cached_layer_facts(ctx: Context, layers: list[Layer], image_id: str | None = None,
                       from_bytes: bool = False) -> list[dict]:
    """layer_facts of each layer, kept per diff ID in the cache: a rebuild that changed one environment layer
    reads only that one. A layer without a file here (the store handed it to the engine) takes its facts from
    the labels of an engine image that has it (layer_facts), else its bytes are read back from the engine:
    from `image_id`, or from an envmgr image that holds it, all in one pass. `from_bytes`: neither the cache
    nor labels, every layer read (what the tests compare the recorded facts with)."""
    from envmgr.build.layer_bytes import with_layer_files
    from envmgr.build.layer_facts import in_engine

    found: dict[str, dict] = {}
    for layer in [] if from_bytes else layers:
        kept = kept_layer_facts(ctx, layer.diff_id)
        if kept is not None:
            found[layer.diff_id] = kept
    todo = [layer for layer in layers if layer.diff_id not in found]
    if not from_bytes and any(not layer.trees and not layer.path.is_file() for layer in todo):
        for _image, recorded in in_engine(ctx):
            for known in recorded.layers:
                if known.diff_id not in found and any(layer.diff_id == known.diff_id for layer in todo):
                    found[known.diff_id] = known.sbom
                    keep_layer_facts(ctx, known.diff_id, known.sbom)
        todo = [layer for layer in layers if layer.diff_id not in found]
    for layer in todo:
        if layer.trees or layer.path.is_file():
            made = tree_layer_facts(layer.trees) if layer.trees else layer_facts(layer.path)
            keep_layer_facts(ctx, layer.diff_id, made)
            found[layer.diff_id] = made
    todo = [layer for layer in layers if layer.diff_id not in found]
    if todo:
        source = image_id or _image_holding(ctx, [layer.diff_id for layer in todo])
        with with_layer_files(ctx, ImageConfig(layers=todo), source) as fetched:
            for layer in fetched.layers:
                made = layer_facts(layer.path)
                keep_layer_facts(ctx, layer.diff_id, made)
                found[layer.diff_id] = made
    return [found[layer.diff_id] for layer in layers]


def _image_holding(ctx: Context, diff_ids: list[str]) -> str:
    """An envmgr image in the engine that has every one of these layers (to read them back from)."""
    from envmgr.core import paths
    from envmgr.core.errors import EnvmgrError

    for summary in ctx.engine.images(label=paths.LABEL_MANAGED):
        layers = set(((ctx.engine.inspect_image(summary["Id"]) or {}).get("RootFS") or {}).get("Layers") or [])
        if set(diff_ids) <= layers:
            return str(summary["Id"])
    raise EnvmgrError(f"{len(diff_ids)} environment layer(s) are neither in this cache nor in any image the engine "
                      f"holds ({', '.join(d[:19] for d in diff_ids)})", hint="rebuild with `envmgr build --force`")


def dpkg_facts(ctx: Context | None, layers: list[Layer]) -> list[list[str | None]]:
    """The installed Debian packages of the topmost of `layers` (base, [system]) that has a dpkg status,
    kept per diff ID in the cache (the base layer is 100 MB to read)."""
    from envmgr.build.layer_facts import dpkg_packages

    for layer in reversed(layers):
        kept = ctx.cache_dir / SBOM_DIR / "dpkg" / f"{layer.diff_id.removeprefix('sha256:')}.json" if ctx else None
        if kept is not None:
            try:
                rows = json.loads(kept.read_text())
                if rows:
                    return rows
                continue
            except (OSError, ValueError):
                pass
        rows = dpkg_packages(dpkg_status(layer.path))
        if kept is not None:
            from envmgr.core.files import atomic_write

            atomic_write(kept, json.dumps(rows))
        if rows:
            return rows
    return []


def dpkg_status(base_layer: Path) -> str:
    with tarfile.open(base_layer, mode="r:") as tar:
        for info in tar:
            if info.name.lstrip("./") == "var/lib/dpkg/status" and info.isfile():
                return tar.extractfile(info).read().decode("utf-8", "replace")  # type: ignore[union-attr]
    return ""
