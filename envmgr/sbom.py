"""What is inside an image, without running it: a CycloneDX JSON SBOM per image.

Read from the image's own layers and the method's lock, never from a container:
- Python distributions: every `*.dist-info` in the environment layer (name, version, and the sha256
  of its RECORD, which names every installed file's hash), with the sha256 of the files the lock allows;
- conda packages: every `conda-meta/*.json` in the environment layer (name, version, build, sha256);
- Debian packages: the base layer's dpkg status (name, version, architecture).

The facts are kept with the image too: its layer-facts label (envmgr.layer_facts) records, per environment
layer, what an SBOM lists of it, and the base's Debian packages, so an SBOM of an image built with the label
reads no layer byte (`generate(..., from_bytes=True)` reads them, for comparison).

It is written at build time beside the image in the cache (`<cache>/sbom/<image id>.cdx.json`),
carried in exports (so a signature covers it) and printed by `envmgr sbom`. The same image gives
the same bytes: the serial number derives from the image ID and the timestamp is the image's.
"""

from __future__ import annotations

import datetime as dt
import email.parser
import hashlib
import json
import os
import re
import tarfile
import tomllib
import uuid
import warnings
from pathlib import Path

from cyclonedx.model import HashAlgorithm, HashType, Property
from cyclonedx.model.bom import Bom, BomMetaData
from cyclonedx.model.component import Component, ComponentType
from cyclonedx.output.json import JsonV1Dot6
from packageurl import PackageURL

from . import __version__
from .base import BaseImage
from .context import Context
from .image import ImageConfig, Layer
from .spec import MethodSpec

SBOM_DIR = "sbom"
FORMATS = ("cyclonedx-json",)
_DIST_INFO = re.compile(r"/site-packages/([^/]+)\.dist-info/(METADATA|RECORD)$")
_CONDA_META = re.compile(r"/conda-meta/[^/]+\.json$")


def path_for(ctx: Context, image_id: str) -> Path:
    return ctx.cache_dir / SBOM_DIR / f"{image_id.removeprefix('sha256:')}.cdx.json"


def store(ctx: Context, image_id: str, data: bytes) -> Path:
    target = path_for(ctx, image_id)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.partial")
    tmp.write_bytes(data)
    os.replace(tmp, target)
    return target


def sbom_bytes(ctx: Context, spec: MethodSpec, base: BaseImage, config: ImageConfig) -> bytes:
    """The image's SBOM from the cache, or made from its layers (and kept) when the cache lacks it."""
    image_id = config.image_id()
    cached = path_for(ctx, image_id)
    if cached.is_file():
        return cached.read_bytes()
    data = generate(spec, base, config, ctx)
    store(ctx, image_id, data)
    return data


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def layer_facts(path: Path) -> dict:
    """What an SBOM needs from one environment layer, read in one pass: each dist-info's name, version and
    RECORD sha256, and each conda-meta record's name, version, build, sha256 and subdir."""
    with tarfile.open(path, mode="r:") as tar:
        return _facts((info.name, lambda info=info: tar.extractfile(info).read())  # type: ignore[union-attr]
                      for info in tar if info.isfile())


def tree_layer_facts(trees) -> dict:
    """layer_facts of a measured layer, from the host trees its bytes are made of (no tar made)."""
    from .image import layer_entries

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


def _facts_of(layers: Path | list[Path] | list[dict]) -> list[dict]:
    items = layers if isinstance(layers, list) else [layers]
    return [item if isinstance(item, dict) else layer_facts(item) for item in items]


def _facts_file(ctx: Context, diff_id: str) -> Path:
    return ctx.cache_dir / SBOM_DIR / "layers" / f"{diff_id.removeprefix('sha256:')}.json"


def kept_layer_facts(ctx: Context, diff_id: str) -> dict | None:
    """The layer_facts this cache keeps for a diff ID (a layer's content never changes under it), or None."""
    try:
        facts = json.loads(_facts_file(ctx, diff_id).read_text())
    except (OSError, ValueError):
        return None
    return facts if isinstance(facts, dict) and {"metadata", "records", "conda"} <= set(facts) else None


def keep_layer_facts(ctx: Context, diff_id: str, facts: dict) -> None:
    from .files import atomic_write

    atomic_write(_facts_file(ctx, diff_id), json.dumps(facts, sort_keys=True))


def cached_layer_facts(ctx: Context, layers: list[Layer], image_id: str | None = None,
                       from_bytes: bool = False) -> list[dict]:
    """layer_facts of each layer, kept per diff ID in the cache: a rebuild that changed one environment layer
    reads only that one. A layer without a file here (the store handed it to the engine) takes its facts from
    the labels of an engine image that has it (layer_facts), else its bytes are read back from the engine:
    from `image_id`, or from an envmgr image that holds it, all in one pass. `from_bytes`: neither the cache
    nor labels, every layer read (what the tests compare the recorded facts with)."""
    from .layer_bytes import with_layer_files
    from .layer_facts import in_engine

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
    from . import paths
    from .errors import EnvmgrError

    for summary in ctx.engine.images(label=paths.LABEL_MANAGED):
        layers = set(((ctx.engine.inspect_image(summary["Id"]) or {}).get("RootFS") or {}).get("Layers") or [])
        if set(diff_ids) <= layers:
            return str(summary["Id"])
    raise EnvmgrError(f"{len(diff_ids)} environment layer(s) are neither in this cache nor in any image the engine "
                      f"holds ({', '.join(d[:19] for d in diff_ids)})", hint="rebuild with `envmgr build --force`")


def dpkg_facts(ctx: Context | None, layers: list[Layer]) -> list[list[str | None]]:
    """The installed Debian packages of the topmost of `layers` (base, [system]) that has a dpkg status,
    kept per diff ID in the cache (the base layer is 100 MB to read)."""
    from .layer_facts import dpkg_packages

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
            from .files import atomic_write

            atomic_write(kept, json.dumps(rows))
        if rows:
            return rows
    return []


def python_components(env_layer: Path | list[Path] | list[dict], lock_hashes: dict[str, list[str]]) -> list[Component]:
    """Every dist-info in the environment's layer(s) (a layered environment has one per distribution group)."""
    metadata: dict[str, list[str]] = {}
    records: dict[str, str] = {}
    for facts in _facts_of(env_layer):
        metadata.update(facts["metadata"])
        records.update(facts["records"])
    found = []
    for dist, (name, version) in sorted(metadata.items()):
        properties = [Property(name="envmgr:installed-record-sha256", value=records.get(dist, "missing"))]
        allowed = lock_hashes.get(_normal(name), [])
        if allowed:
            properties.append(Property(name="envmgr:lock-file-sha256", value=" ".join(sorted(allowed))))
        purl = PackageURL("pypi", None, _normal(name), version)
        found.append(Component(
            name=name, version=version, type=ComponentType.LIBRARY, purl=purl, bom_ref=f"{purl}",
            hashes=[HashType(alg=HashAlgorithm.SHA_256, content=records[dist])] if dist in records else [],
            properties=properties))
    return found


def conda_components(env_layer: Path | list[Path] | list[dict]) -> list[Component]:
    found = []
    for facts in _facts_of(env_layer):
        for record in facts["conda"]:
            purl = PackageURL("conda", None, record["name"], record.get("version"),
                              {"build": record["build"]} if record.get("build") else None)
            sha = record.get("sha256")
            found.append(Component(
                name=record["name"], version=record.get("version"), type=ComponentType.LIBRARY, purl=purl,
                bom_ref=f"{purl}", hashes=[HashType(alg=HashAlgorithm.SHA_256, content=sha)] if sha else [],
                properties=[Property(name="envmgr:conda-subdir", value=str(record.get("subdir", "")))]))
    return sorted(found, key=lambda c: (c.name, str(c.version)))


def dpkg_status(base_layer: Path) -> str:
    with tarfile.open(base_layer, mode="r:") as tar:
        for info in tar:
            if info.name.lstrip("./") == "var/lib/dpkg/status" and info.isfile():
                return tar.extractfile(info).read().decode("utf-8", "replace")  # type: ignore[union-attr]
    return ""


def debian_components(status: str | list[list[str | None]]) -> list[Component]:
    """Every installed package of a dpkg status file (or its layer_facts.dpkg_packages rows)."""
    from .layer_facts import dpkg_packages

    found = []
    for name, version, arch in dpkg_packages(status) if isinstance(status, str) else status:
        purl = PackageURL("deb", "debian", name, version, {"arch": arch} if arch else None)
        found.append(Component(name=str(name), version=version, type=ComponentType.LIBRARY, purl=purl,
                               bom_ref=f"{purl}"))
    return sorted(found, key=lambda c: str(c.name))


def lock_file_hashes(spec: MethodSpec) -> dict[str, list[str]]:
    """name -> sha256 of every file a poetry lock allows for it (conda packages carry their own)."""
    lock = spec.lock_path / "poetry.lock"
    if not lock.is_file():
        return {}
    data = tomllib.loads(lock.read_text())
    found: dict[str, list[str]] = {}
    for package in data.get("package", []):
        hashes = [f["hash"].removeprefix("sha256:") for f in package.get("files", [])
                  if str(f.get("hash", "")).startswith("sha256:")]
        found[_normal(package["name"])] = hashes
    return found


def recorded_facts(spec: MethodSpec, config: ImageConfig) -> tuple[list[dict], list[list[str | None]]] | None:
    """(environment layers' facts, Debian packages) from the image's layer-facts label, when it has one that
    names every environment layer; None otherwise (an image built before the label)."""
    from .layer_facts import ImageFacts

    facts = ImageFacts.from_labels(config.labels)
    env_end = -2 if spec.system.apt else -1
    wanted = [layer.diff_id for layer in config.layers[1:env_end]]
    if facts is None or [layer.diff_id for layer in facts.layers] != wanted:
        return None
    return [layer.sbom for layer in facts.layers], facts.dpkg


def generate(spec: MethodSpec, base: BaseImage, config: ImageConfig, ctx: Context | None = None,
             from_bytes: bool = False) -> bytes:
    """The image's SBOM: from the facts its labels record (no layer read), or, for an image without them or
    with `from_bytes`, from its layers' bytes (the cache's per-layer facts, or the engine's copy)."""
    # base, environment layers, [system packages,] method: the system layer's dpkg status holds the base's too
    env_end = -2 if spec.system.apt else -1
    env_slice = config.layers[1:env_end]
    recorded = None if from_bytes else recorded_facts(spec, config)
    env_layer: list[Path] | list[dict]
    if recorded is not None:
        env_layer, status = recorded
    else:
        env_layer = [layer.path for layer in env_slice] if ctx is None else \
            cached_layer_facts(ctx, env_slice, config.image_id(), from_bytes=from_bytes)
        system = [config.layers[0], *config.layers[env_end:-1]]
        if ctx is not None and not all(layer.path.is_file() for layer in system):   # read back from the engine
            from .layer_bytes import with_layer_files

            with with_layer_files(ctx, ImageConfig(layers=system), config.image_id()) as fetched:
                status = dpkg_facts(None, fetched.layers)
        else:
            status = dpkg_facts(None, system)
    image_id = config.image_id()
    components = [*python_components(env_layer, lock_file_hashes(spec)), *conda_components(env_layer),
                  *debian_components(status)]
    root = Component(name=spec.image_repository, version=config.labels.get("org.envmgr.inputs-hash", "")[:16],
                     type=ComponentType.CONTAINER, bom_ref=image_id,
                     hashes=[HashType(alg=HashAlgorithm.SHA_256, content=image_id.removeprefix("sha256:"))],
                     properties=[Property(name="envmgr:method", value=spec.name),
                                 Property(name="envmgr:backend", value=spec.backend),
                                 Property(name="envmgr:base-image", value=base.image_id),
                                 Property(name="envmgr:version", value=__version__)])
    bom = Bom(components=components, serial_number=uuid.uuid5(uuid.NAMESPACE_URL, f"envmgr:{image_id}"),
              metadata=BomMetaData(timestamp=dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc), component=root))
    bom.register_dependency(root, components)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the library warns about graph completeness we do not claim
        text = JsonV1Dot6(bom).output_as_string(indent=1)
    return text.encode()


def for_method(ctx: Context, method: str, fmt: str = "cyclonedx-json") -> tuple[str, bytes]:
    """(image ID, SBOM bytes) of the method's current image."""
    from .build import require_image
    from .errors import UsageError

    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    wanted, image_id = require_image(ctx, method)
    cached = path_for(ctx, image_id)
    if cached.is_file():
        return image_id, cached.read_bytes()
    from .layer_bytes import exported_config

    config = exported_config(ctx, wanted, image_id)
    return image_id, sbom_bytes(ctx, wanted.spec, wanted.base, config)
