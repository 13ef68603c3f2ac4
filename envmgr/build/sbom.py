"""What is inside an image, without running it: a CycloneDX JSON SBOM per image.

Read from the image's own layers and the method's lock, never from a container:
- Python distributions: every `*.dist-info` in the environment layer (name, version, and the sha256
  of its RECORD, which names every installed file's hash), with the sha256 of the files the lock allows;
- conda packages: every `conda-meta/*.json` in the environment layer (name, version, build, sha256);
- Debian packages: the base layer's dpkg status (name, version, architecture).

The facts are kept with the image too: its layer-facts label (envmgr.build.layer_facts) records, per environment
layer, what an SBOM lists of it, and the base's Debian packages, so an SBOM of an image built with the label
reads no layer byte (`generate(..., from_bytes=True)` reads them, for comparison).

It is written at build time beside the image in the cache (`<cache>/sbom/<image id>.cdx.json`),
carried in exports (so a signature covers it) and printed by `envmgr sbom`. The same image gives
the same bytes: the serial number derives from the image ID and the timestamp is the image's.
"""

from __future__ import annotations

import datetime as dt
import os
import uuid
import warnings
from pathlib import Path

from cyclonedx.model import HashAlgorithm, HashType, Property
from cyclonedx.model.bom import Bom, BomMetaData
from cyclonedx.model.component import Component, ComponentType
from cyclonedx.output.json import JsonV1Dot6
from packageurl import PackageURL

from envmgr import __version__
from envmgr.build.contents import cached_layer_facts, dpkg_facts, facts_of, normal_name
from envmgr.build.layer_facts import SBOM_DIR
from envmgr.core.spec import MethodSpec
from envmgr.door.context import Context
from envmgr.images.base import BaseImage
from envmgr.images.image import ImageConfig
from envmgr.lock.backends import get_backend

FORMATS = ("cyclonedx-json",)


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


























def python_components(env_layer: Path | list[Path] | list[dict], lock_hashes: dict[str, list[str]]) -> list[Component]:
    """Every dist-info in the environment's layer(s) (a layered environment has one per distribution group)."""
    metadata: dict[str, list[str]] = {}
    records: dict[str, str] = {}
    for facts in facts_of(env_layer):
        metadata.update(facts["metadata"])
        records.update(facts["records"])
    found = []
    for dist, (name, version) in sorted(metadata.items()):
        properties = [Property(name="envmgr:installed-record-sha256", value=records.get(dist, "missing"))]
        allowed = lock_hashes.get(normal_name(name), [])
        if allowed:
            properties.append(Property(name="envmgr:lock-file-sha256", value=" ".join(sorted(allowed))))
        purl = PackageURL("pypi", None, normal_name(name), version)
        found.append(Component(
            name=name, version=version, type=ComponentType.LIBRARY, purl=purl, bom_ref=f"{purl}",
            hashes=[HashType(alg=HashAlgorithm.SHA_256, content=records[dist])] if dist in records else [],
            properties=properties))
    return found


def conda_components(env_layer: Path | list[Path] | list[dict]) -> list[Component]:
    found = []
    for facts in facts_of(env_layer):
        for record in facts["conda"]:
            purl = PackageURL("conda", None, record["name"], record.get("version"),
                              {"build": record["build"]} if record.get("build") else None)
            sha = record.get("sha256")
            found.append(Component(
                name=record["name"], version=record.get("version"), type=ComponentType.LIBRARY, purl=purl,
                bom_ref=f"{purl}", hashes=[HashType(alg=HashAlgorithm.SHA_256, content=sha)] if sha else [],
                properties=[Property(name="envmgr:conda-subdir", value=str(record.get("subdir", "")))]))
    return sorted(found, key=lambda c: (c.name, str(c.version)))




def debian_components(status: str | list[list[str | None]]) -> list[Component]:
    """Every installed package of a dpkg status file (or its layer_facts.dpkg_packages rows)."""
    from envmgr.build.layer_facts import dpkg_packages

    found = []
    for name, version, arch in dpkg_packages(status) if isinstance(status, str) else status:
        purl = PackageURL("deb", "debian", name, version, {"arch": arch} if arch else None)
        found.append(Component(name=str(name), version=version, type=ComponentType.LIBRARY, purl=purl,
                               bom_ref=f"{purl}"))
    return sorted(found, key=lambda c: str(c.name))


def recorded_facts(spec: MethodSpec, config: ImageConfig) -> tuple[list[dict], list[list[str | None]]] | None:
    """(environment layers' facts, Debian packages) from the image's layer-facts label, when it has one that
    names every environment layer; None otherwise (an image built before the label)."""
    from envmgr.build.layer_facts import ImageFacts

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
            from envmgr.build.layer_bytes import with_layer_files

            with with_layer_files(ctx, ImageConfig(layers=system), config.image_id()) as fetched:
                status = dpkg_facts(None, fetched.layers)
        else:
            status = dpkg_facts(None, system)
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
