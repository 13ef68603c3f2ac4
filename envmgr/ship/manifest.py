"""An export archive's head: its manifest (`envmgr/export.json`) and signature, read without loading
anything. Full and thin exports (thin.py) and import (transfer.py) read it here."""

from __future__ import annotations

import json
from pathlib import Path

from envmgr.core.errors import UsageError
from envmgr.ship.trust import read_head

FORMAT = "envmgr-export/2"   # 2: method files once (in the method layer), SBOM, signature
MANIFEST = "envmgr/export.json"
THIN_FORMAT = "envmgr-export/2+thin"   # a thin export: layers the target has are left out (thin.py)


class ArchiveError(UsageError):
    """A damaged, truncated or foreign archive: bad input, exit 2; nothing was loaded."""


def read_manifest(path: Path) -> dict:
    return read_signed_manifest(path)[0]


def read_signed_manifest(path: Path) -> tuple[dict, bytes, bytes | None]:
    """The manifest, its exact bytes (what a signature covers) and the signature document, if any."""
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    manifest_bytes, signature = read_head(path, MANIFEST)
    try:
        manifest = json.loads(manifest_bytes)
    except json.JSONDecodeError as exc:
        raise ArchiveError(f"{path}: not a readable envmgr export ({exc}); nothing was loaded") from None
    if not isinstance(manifest, dict) or manifest.get("format") not in (FORMAT, THIN_FORMAT):
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise ArchiveError(f"{path}: format {found!r} is not {FORMAT!r}; nothing was loaded")
    return manifest, manifest_bytes, signature
