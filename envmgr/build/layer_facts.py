"""What a method image's layers hold, recorded in the image's own config (issue 26): the engine as the
source of truth for layers, and the SBOM without reading layer bytes.

The label `org.envmgr.layer-facts` (paths.LABEL_LAYER_FACTS) carries, for each environment layer (bottom
first): its diff ID and size, its group key and the locked distributions in it (unit key, name, installed
size, RECORD hash, torch's GPU architectures), and what an SBOM lists of it (each dist-info's name, version
and RECORD sha256; each conda record); and the Debian packages of the base (and system) layer.

Every fact depends on the layers' contents alone (keys are hashes of the lock's lines, sizes and hashes of
deterministic bytes), never on the cache that built the image: the same inputs still give the same image ID
on any machine. A cache that has never seen a layer reads these facts back from the images the engine holds
(layers.learn_from_engine): a second base dir, a new cache, or a server that imported an archive reuses
every layer the engine has instead of installing it again. `envmgr sbom` reads them instead of the layers.
"""

from __future__ import annotations

import base64
import hashlib
import json
import posixpath
import re
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from envmgr.core import paths
from envmgr.door.context import Context

LABEL = paths.LABEL_LAYER_FACTS
VERSION = 1


class UnitFacts(BaseModel):
    """One locked distribution of a layered environment, as the layer store records it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str                       # its unit key (layers.units)
    name: str                      # normalized name
    size: int                      # installed size, its bytecode and the shared files it leaves out included
    record: str                    # "sha256=<b64>" of the RECORD its install left
    gpu_archs: list[str] | None = None   # torch only: torch.cuda.get_arch_list()


class LayerFacts(BaseModel):
    """One environment layer: where it sits, what makes it, what an SBOM lists of it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    diff_id: str
    size: int
    group: str | None = None       # its group key (layers.Group.key); None for a one-layer (conda) environment
    units: list[UnitFacts] = []
    sbom: dict                     # sbom.layer_facts of its bytes: {"metadata", "records", "conda"}


class ImageFacts(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = VERSION
    layers: list[LayerFacts]       # the environment layers, bottom first
    dpkg: list[list[str | None]]   # [package, version, architecture] installed in the base (and system) layer

    def to_label(self) -> str:
        """Deterministic JSON: sorted keys, no spaces (the label is part of the image ID)."""
        return json.dumps(self.model_dump(exclude_none=True), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_labels(cls, labels: dict[str, str] | None) -> ImageFacts | None:
        """The facts an image's labels carry; None when it has none (built before them) or of another version."""
        text = (labels or {}).get(LABEL)
        if not text:
            return None
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or data.get("version") != VERSION:
                return None
            return cls.model_validate(data)
        except (ValueError, ValidationError):
            return None

    def layer(self, diff_id: str) -> LayerFacts | None:
        return next((layer for layer in self.layers if layer.diff_id == diff_id), None)


def dpkg_packages(status: str) -> list[list[str | None]]:
    """[package, version, architecture] of every installed package in a dpkg status file, by name."""
    found = []
    for stanza in re.split(r"\n\s*\n", status):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line and not line[0].isspace() and ":" in line:
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
        if "Package" not in fields or "installed" not in fields.get("Status", "").split():
            continue
        found.append([fields["Package"], fields.get("Version"), fields.get("Architecture")])
    return sorted(found, key=lambda row: str(row[0]))


def record_hash(data: bytes) -> str:
    """A RECORD's hash as the layer store keeps it: `sha256=<urlsafe base64 without padding>`."""
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode("ascii")


def record_files(record: bytes, site: str, prefix: str) -> list[list[str]]:
    """A RECORD's rows as the split keeps them (layers.SPLIT_SCRIPT's read_units): [path in the prefix, hash,
    size], sorted by path, the last row of a path winning. `site` is the absolute site-packages folder."""
    import csv
    import io

    rows: dict[str, tuple[str, str]] = {}
    for row in csv.reader(io.StringIO(record.decode("utf-8"), newline="")):
        if not row:
            continue
        path = posixpath.normpath(posixpath.join(site, row[0]))
        if not path.startswith(prefix.rstrip("/") + "/"):
            raise ValueError(f"RECORD names a file outside the environment: {row[0]}")
        inner = path[len(prefix.rstrip("/")) + 1:]
        rows[inner] = (row[1] if len(row) > 1 else "", row[2] if len(row) > 2 else "")
    return [[inner, digest, size] for inner, (digest, size) in sorted(rows.items())]


def dist_info_of(layer: LayerFacts, name: str) -> str | None:
    """The dist-info folder of the distribution `name` (normalized) in this layer, from its SBOM facts."""
    normal = re.sub(r"[-_.]+", "-", name).lower()
    for folder, (dist_name, _version) in sorted(layer.sbom.get("metadata", {}).items()):
        if re.sub(r"[-_.]+", "-", str(dist_name)).lower() == normal:
            return f"{folder}.dist-info"
    return None


# Runs in the image with its base's interpreter (-S -I: no site-packages, no environment variables), so no
# file of the environment runs: prints each named file, base64 in short lines, between markers.
READ_FILES_SCRIPT = r"""
import base64, sys
for path in sys.argv[1:]:
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError:
        print("ENVMGR-FILE-MISSING " + path, flush=True)
        continue
    text = base64.b64encode(data).decode("ascii")
    print("ENVMGR-FILE " + path, flush=True)
    for start in range(0, len(text), 8000):
        print("ENVMGR-DATA " + text[start:start + 8000])
    print("ENVMGR-END", flush=True)
"""


def parse_read_files(lines: Iterable[str]) -> dict[str, bytes]:
    """What READ_FILES_SCRIPT printed: path -> bytes (missing files left out)."""
    found: dict[str, bytes] = {}
    current: str | None = None
    chunks: list[str] = []
    for line in lines:
        if line.startswith("ENVMGR-FILE "):
            current, chunks = line[len("ENVMGR-FILE "):], []
        elif line.startswith("ENVMGR-DATA ") and current is not None:
            chunks.append(line[len("ENVMGR-DATA "):].strip())
        elif line.startswith("ENVMGR-END") and current is not None:
            found[current] = base64.b64decode("".join(chunks))
            current = None
    return found


def in_engine(ctx) -> list[tuple[str, ImageFacts]]:
    """(image ID, facts) of every image in the engine whose labels carry layer facts: one listing, no bytes."""
    found = []
    for summary in ctx.engine.images(label=LABEL):
        facts = ImageFacts.from_labels(summary.get("Labels"))
        if facts is not None:
            found.append((str(summary["Id"]), facts))
    return sorted(found)


def read_image_files(ctx, image_id: str, python: str, files: list[str], method: str) -> dict[str, bytes]:
    """The bytes of a few small files of the engine's image `image_id` (path -> bytes; missing ones left out).

    One container of the image runs its base's interpreter isolated (-S -I, PATH of the base only), with no
    network, no capabilities, as nobody, on a read-only root: nothing of the environment runs.
    """
    return parse_read_files(_run_reader(ctx, image_id, python, READ_FILES_SCRIPT, files, method))


# Appended to READ_FILES_SCRIPT (and elf_needed's reader) by read_image_records: for each RECORD read, the ELF
# facts of the shared objects it names, one line per file (short lines: the log stream splits long ones).
ELF_PART = r"""
import csv, io, json, posixpath
SITE, PREFIX = sys.argv[1], sys.argv[2]
for record in sys.argv[3:]:
    try:
        with open(record, encoding="utf-8") as fh:
            rows = list(csv.reader(io.StringIO(fh.read(), newline="")))
    except (OSError, ValueError):
        continue
    for row in rows:
        if not row or ".so" not in posixpath.basename(row[0]):
            continue
        path = posixpath.normpath(posixpath.join(SITE, row[0]))
        if os.path.islink(path) or not os.path.isfile(path):
            continue
        info = dynamic_info(path)
        if info is not None:
            print("ENVMGR-ELF " + json.dumps([record, posixpath.relpath(path, PREFIX), list(info)]), flush=True)
print("ENVMGR-ELF-DONE", flush=True)
"""


def read_image_records(ctx, image_id: str, python: str, records: list[str], site: str, prefix: str,
                       method: str) -> tuple[dict[str, bytes], dict[str, dict[str, list]]]:
    """(RECORD path -> its bytes, RECORD path -> the ELF facts of the shared objects it names, by path in
    `prefix`) read from the engine's image in one container, as read_image_files does (nothing of the
    environment runs: the ELF headers are parsed as bytes by the base's interpreter). A RECORD whose facts
    did not all arrive has none (its system-library check then scans the image)."""
    from envmgr.build import elf_needed

    reader = Path(elf_needed.__file__).read_text().split('\nif __name__ == "__main__":')[0]
    script = reader + READ_FILES_SCRIPT.replace("sys.argv[1:]", "sys.argv[3:]") + ELF_PART
    lines = _run_reader(ctx, image_id, python, script, [site, prefix, *records], method)
    elf: dict[str, dict[str, list]] = {}
    if "ENVMGR-ELF-DONE" in lines:
        elf = {record: {} for record in records}
        for line in lines:
            if line.startswith("ENVMGR-ELF "):
                record, inner, info = json.loads(line[len("ENVMGR-ELF "):])
                elf.setdefault(record, {})[inner] = info
    return parse_read_files(lines), elf


def _run_reader(ctx, image_id: str, python: str, script: str, args: list[str], method: str) -> list[str]:
    from envmgr.door.containers import ContainerSpec

    lines: list[str] = []
    container = ContainerSpec(
        image=image_id, command=[python, "-S", "-I", "-B", "-c", script, *args],
        env={"PATH": "/usr/bin:/bin"}, user="65534:65534", network="none",
        labels={paths.LABEL_KIND: "step", paths.LABEL_METHOD: method}).hardened(pids_limit=64)
    code = ctx.engine.run(container, on_line=lines.append).exit_code
    if code != 0:
        ctx.ui.log(f"reading {len(args)} file(s) from image {image_id[:19]} failed (exit {code}): "
                   + " | ".join(lines[-3:]))
        return []
    return lines


# ---------------------------------------------------------------- what a cache keeps per diff ID

SBOM_DIR = "sbom"   # <cache>/sbom: the SBOM of each image, and (layers/) the facts of each layer it read


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
    from envmgr.core.files import atomic_write

    atomic_write(_facts_file(ctx, diff_id), json.dumps(facts, sort_keys=True))
