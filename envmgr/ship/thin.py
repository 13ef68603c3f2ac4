"""Thin exports: an archive that leaves out the layers its target server already has.

`envmgr export M -o F --thin-for TARGET` (TARGET: an image reference or ID in this engine, or an earlier
`envmgr export` archive, read without loading it) leaves out of the archive the layers the image shares
with the target, and names them in `envmgr/export.json` under `left_out` (diff ID, size, the history
entry that made the layer). export.json is what a signature covers, so the list cannot be edited
unnoticed; a thin archive's format is `envmgr-export/2+thin`, which an envmgr that does not know thin
archives refuses by name instead of failing inside the engine.

The Docker Engine keeps layers by chain (a layer together with every layer under it), and its loader
looks a layer's chain up before it opens the layer's file: a docker-archive may name layers it does not
carry when the engine already has their chain. So what can be left out is the longest common prefix of
the two images' layer lists (the base, then the environment layers the two share in the same order),
never the last layer (the method layer: an import stages the method's files from it). A layer that the
target has at another position travels anyway.

`envmgr import` of a thin archive asks the engine for the left-out chain before anything is checked or
loaded, and refuses, naming each missing layer (short diff ID, what made it, size), when it lacks any.
"""

from __future__ import annotations

import re
from pathlib import Path

from envmgr.core.errors import UsageError
from envmgr.door.context import Context
from envmgr.images.image import ImageConfig
from envmgr.ship.manifest import THIN_FORMAT, read_manifest
from envmgr.ship.trust import TrustError

LEFT_OUT = "left_out"
THIN_FOR = "thin_for"
_DIFF_ID = re.compile(r"sha256:[0-9a-f]{64}")


def short(diff_id: str) -> str:
    return diff_id.removeprefix("sha256:")[:12]


def archive_layers(manifest: dict) -> list[str]:
    """An export archive's layer diff IDs in image order: the left-out ones first, then those it carries."""
    left = [entry["diff_id"] for entry in manifest.get(LEFT_OUT) or []]
    carried = ["sha256:" + m["name"].split("/", 1)[0] for m in manifest.get("members", [])
               if m.get("name", "").endswith("/layer.tar")]
    return left + carried


def target_layers(ctx: Context, target: str) -> tuple[str, list[str]]:
    """(image ID, layer diff IDs) of `--thin-for TARGET`: an export archive file, or an engine image."""
    path = Path(target)
    if path.is_file():
        manifest = read_manifest(path)   # only export.json: nothing is loaded or fully read
        return str(manifest.get("image_id", "")), archive_layers(manifest)
    found = ctx.engine.inspect_image(target)
    if found is None:
        raise UsageError(f"--thin-for {target}: neither an export archive file nor an image in the engine",
                         hint="name an image (reference or ID) the target server has, or an archive sent there")
    return found["Id"], list((found.get("RootFS") or {}).get("Layers") or [])


def shared_prefix(layers: list[str], target: list[str]) -> int:
    """How many of `layers` may be left out for a server that has `target`: their common prefix (the
    engine finds layers by chain), never the last layer (the method layer travels: import needs it)."""
    count = 0
    while count < min(len(layers) - 1, len(target)) and layers[count] == target[count]:
        count += 1
    return count


def left_out_entries(config: ImageConfig, count: int) -> list[dict]:
    """What export.json records of the first `count` layers: diff ID, size and the history entry."""
    history = config.history if len(config.history) == len(config.layers) else [""] * len(config.layers)
    return [{"diff_id": layer.diff_id, "size": layer.size, "history": history[i]}
            for i, layer in enumerate(config.layers[:count])]


def check_listing(path: Path, manifest: dict) -> None:
    """The left-out list is well formed, and present exactly when the format says thin."""
    thin = manifest.get("format") == THIN_FORMAT
    left = manifest.get(LEFT_OUT)
    if not thin:
        if left is not None:
            raise TrustError(f"{path}: a full archive with a {LEFT_OUT} list; nothing was loaded")
        return
    if not isinstance(left, list) or not left:
        raise TrustError(f"{path}: a thin archive without the list of layers it left out; nothing was loaded")
    carried = {m.get("name") for m in manifest.get("members", [])}
    seen: set[str] = set()
    for entry in left:
        diff_id = entry.get("diff_id") if isinstance(entry, dict) else None
        if not isinstance(diff_id, str) or not _DIFF_ID.fullmatch(diff_id) or diff_id in seen:
            raise TrustError(f"{path}: its {LEFT_OUT} list is malformed ({entry!r}); nothing was loaded")
        if f"{diff_id.removeprefix('sha256:')}/layer.tar" in carried:
            raise TrustError(f"{path}: layer {short(diff_id)} is both carried and left out; nothing was loaded")
        seen.add(diff_id)


def check_config(path: Path, manifest: dict, config: dict) -> None:
    """The image's layers are the left-out ones (first, in order), then the carried ones: none is lost."""
    diff_ids = list((config.get("rootfs") or {}).get("diff_ids") or [])
    left = [entry["diff_id"] for entry in manifest.get(LEFT_OUT) or []]
    carried = {m["name"] for m in manifest["members"] if m["name"].endswith("/layer.tar")}
    if diff_ids[:len(left)] != left:
        raise TrustError(f"{path}: the layers it left out are not the image's first {len(left)} layers; "
                         "nothing was loaded")
    lost = [d for d in diff_ids[len(left):] if f"{d.removeprefix('sha256:')}/layer.tar" not in carried]
    if lost:
        raise TrustError(f"{path}: the image's layer {short(lost[0])} is neither in the archive nor in its "
                         f"{LEFT_OUT} list; nothing was loaded")


def describe(entry: dict) -> str:
    what = entry.get("history") or "a layer"
    size = entry.get("size")
    return f"{short(entry['diff_id'])} ({what}{f', {size / 1e6:.1f} MB' if isinstance(size, int) else ''})"


def missing_layers(ctx: Context, manifest: dict) -> list[dict]:
    """The left-out layers the engine here lacks (by chain, as its loader looks them up)."""
    left = manifest.get(LEFT_OUT) or []
    present = ctx.engine.present_layers([entry["diff_id"] for entry in left])
    return [entry for entry in left if entry["diff_id"] not in present]


def refusal(path: Path, manifest: dict, missing: list[dict]) -> str:
    target = (manifest.get(THIN_FOR) or {}).get("image_id") or "another image"
    return (f"{path}: a thin archive (made for a server with {str(target)[:19]}) whose left-out layers this "
            f"engine lacks: {', '.join(describe(entry) for entry in missing)}; nothing was loaded")
