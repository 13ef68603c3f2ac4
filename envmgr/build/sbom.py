"""What is inside an image, without running it: a CycloneDX JSON SBOM per image.

Read from the image's own layers and the method's lock, never from a container:
- Python distributions: every `*.dist-info` in the environment layer (name, version, and the sha256
  of its RECORD, which names every installed file's hash), with the sha256 of the files the lock allows;
- conda packages: every `conda-meta/*.json` in the environment layer (name, version, build, sha256);
- Debian packages: the base layer's dpkg status (name, version, architecture).

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
import uuid
import warnings
from pathlib import Path

from cyclonedx.model import HashAlgorithm, HashType, Property
from cyclonedx.model.bom import Bom, BomMetaData
from cyclonedx.model.component import Component, ComponentType
from cyclonedx.output.json import JsonV1Dot6
from packageurl import PackageURL

from envmgr import __version__
from envmgr.core.spec import MethodSpec
from envmgr.door.context import Context
from envmgr.images.base import BaseImage
from envmgr.images.image import ImageConfig, Layer
from envmgr.lock.backends import get_backend

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


def _facts_of(layers: Path | list[Path] | list[dict]) -> list[dict]:
    items = layers if isinstance(layers, list) else [layers]
    return [item if isinstance(item, dict) else layer_facts(item) for item in items]


def _facts_file(ctx: Context, diff_id: str) -> Path:
    return ctx.cache_dir / SBOM_DIR / "layers" / f"{diff_id.removeprefix('sha256:')}.json"


def cached_layer_facts(ctx: Context, layers: list[Layer], image_id: str) -> list[dict]:
    """layer_facts of each layer, kept per diff ID in the cache: a layer's content never changes under its
    diff ID, so a rebuild that changed one environment layer reads only that one. Layers the store handed
    to the engine are read back from the engine's image `image_id`, all in one pass."""
    from envmgr.build.layer_bytes import with_layer_files
    from envmgr.core.files import atomic_write

    found: dict[str, dict] = {}
    for layer in layers:
        try:
            found[layer.diff_id] = json.loads(_facts_file(ctx, layer.diff_id).read_text())
        except (OSError, ValueError):
            pass
    todo = [layer for layer in layers if layer.diff_id not in found]
    with with_layer_files(ctx, ImageConfig(layers=[la for la in todo if not la.trees]), image_id) as fetched:
        files = {layer.diff_id: layer.path for layer in fetched.layers}
        for layer in todo:
            facts = tree_layer_facts(layer.trees) if layer.trees else layer_facts(files[layer.diff_id])
            atomic_write(_facts_file(ctx, layer.diff_id), json.dumps(facts, sort_keys=True))
            found[layer.diff_id] = facts
    return [found[layer.diff_id] for layer in layers]


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


def debian_components(status: str) -> list[Component]:
    found = []
    for stanza in re.split(r"\n\s*\n", status):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line and not line[0].isspace() and ":" in line:
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
        if "Package" not in fields or "installed" not in fields.get("Status", "").split():
            continue
        arch = fields.get("Architecture")
        purl = PackageURL("deb", "debian", fields["Package"], fields.get("Version"), {"arch": arch} if arch else None)
        found.append(Component(name=fields["Package"], version=fields.get("Version"), type=ComponentType.LIBRARY,
                               purl=purl, bom_ref=f"{purl}"))
    return sorted(found, key=lambda c: c.name)


def generate(spec: MethodSpec, base: BaseImage, config: ImageConfig, ctx: Context | None = None) -> bytes:
    # base, environment layers, [system packages,] method: the system layer's dpkg status holds the base's too
    env_end = -2 if spec.system.apt else -1
    env_slice = config.layers[1:env_end]
    env_layer: list[Path] | list[dict] = [layer.path for layer in env_slice] if ctx is None else \
        cached_layer_facts(ctx, env_slice, config.image_id())
    system = [config.layers[0], *config.layers[env_end:-1]]
    if ctx is not None and not all(layer.path.is_file() for layer in system):   # read back from the engine
        from envmgr.build.layer_bytes import with_layer_files

        with with_layer_files(ctx, ImageConfig(layers=system), config.image_id()) as fetched:
            status = next((text for layer in reversed(fetched.layers) if (text := dpkg_status(layer.path))), "")
    else:
        status = next((text for layer in reversed(system) if (text := dpkg_status(layer.path))), "")
    image_id = config.image_id()
    components = [*python_components(env_layer, get_backend(spec).lock_file_hashes(spec)), *conda_components(env_layer),
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
    from envmgr.build.target import require_image
    from envmgr.core.errors import UsageError

    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    wanted, image_id = require_image(ctx, method)
    cached = path_for(ctx, image_id)
    if cached.is_file():
        return image_id, cached.read_bytes()
    from envmgr.build.layer_bytes import exported_config

    config = exported_config(ctx, wanted, image_id)
    return image_id, sbom_bytes(ctx, wanted.spec, wanted.base, config)
