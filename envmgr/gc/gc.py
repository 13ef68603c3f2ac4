"""`envmgr gc`: remove what superseded locks left behind, never what is in use.

Removed: method images (label org.envmgr.method) that are not their method's current image and not
among its N most recently tagged ones; stopped envmgr containers; cached layers no kept image uses;
leftovers of interrupted builds in the cache and in the engine (partial images of a stepped load); SBOMs
and signature records (`<cache>/sbom/`, `<cache>/signatures/`) whose image is gone or removed by this gc;
download caches trimmed to what current locks name, superseded base rootfs and lock tools
(envmgr/gc/caches.py has the rule; `--all` empties the download caches). Kept, always: the current
image of every method, any image a container uses (running or stopped, envmgr's or not), the images of
methods this base dir does not know (another base dir's), and work folders while a build holds its lock.
Removal goes tag by tag without force, so an image that a container started to use meanwhile is refused
by the engine and kept.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from envmgr.build.layers import RELEASE_BYTES, LayerStore
from envmgr.build.sbom import SBOM_DIR
from envmgr.build.target import build_running, target
from envmgr.core import paths
from envmgr.core.errors import EngineError, UsageError
from envmgr.core.spec import list_methods
from envmgr.core.variants import all_variants
from envmgr.door.context import Context
from envmgr.gc.disk import image_layers
from envmgr.images.base import current_base
from envmgr.images.image import file_sha256
from envmgr.lock.uv_cache import shared_uv_cache
from envmgr.ship.trust import SIGNATURES_DIR

# env-<method>-<key>, method-<method>-<key>, and system-<key> (shared by the methods naming the same packages)
LAYER_FILE = re.compile(r"^(env|method|system)-(?:(.+)-)?([0-9a-f]{32})\.(tar|json)$")
IMAGE_RECORDS = (("sbom", SBOM_DIR, ".cdx.json"), ("signature", SIGNATURES_DIR, ".json"))
IMAGE_ID_HEX = re.compile(r"^[0-9a-f]{64}$")
STOPPED = ("created", "exited", "dead")
CREATED_GRACE_S = 120


@dataclass
class Item:
    kind: str          # image | container | layer | layer-copy | work | sbom | signature | cache
    what: str
    bytes: int = 0
    why: str = ""
    paths: list[str] = field(default_factory=list)   # a cache trim: the entries it removes


@dataclass
class Plan:
    remove: list[Item] = field(default_factory=list)
    keep: list[Item] = field(default_factory=list)

    def freed(self) -> int:
        return sum(item.bytes for item in self.remove)


def _current_images(ctx: Context, only: set[str] | None) -> dict[str, str | None]:
    """method (`name` or `name/variant`) -> the image ID its current inputs give (None where this
    server cannot tell)."""
    current: dict[str, str | None] = {}
    for method in list_methods(ctx.config.base_dir):
        if only and method.name not in only:
            continue
        for spec in all_variants(method):
            key = _image_group(spec.name, spec.variant)
            base = current_base(ctx, spec.base_image)
            if base is None:
                current[key] = None
                continue
            current[key] = ctx.engine.image_id(target(ctx, spec, base).tag) or ""
    return current


def _image_group(method: str, variant: str | None) -> str:
    """Images are kept per method and variant: a variant's current image is never another's old one."""
    return f"{method}/{variant}" if variant else method


def plan(ctx: Context, keep: int = 1, methods: list[str] | None = None, everything: bool = False) -> Plan:
    if keep < 0:
        raise UsageError("--keep must be 0 or more")
    only = set(methods or [])
    result = Plan()
    current = _current_images(ctx, only or None)
    unknown = only - set(current)
    if unknown:
        raise UsageError(f"unknown method {', '.join(sorted(unknown))}", hint="`envmgr list` shows every method")

    containers = ctx.engine.containers()
    doomed: set[str] = set()
    for container in containers:
        labels = container.get("Labels") or {}
        if labels.get(paths.LABEL_MANAGED) != "true" or container.get("State") not in STOPPED:
            continue
        if container.get("State") == "created" and time.time() - container.get("Created", 0) < CREATED_GRACE_S:
            continue  # a run or build between creating its container and starting it
        if only and labels.get(paths.LABEL_METHOD) not in only:
            continue
        doomed.add(container["Id"])
        name = (container.get("Names") or [container["Id"][:12]])[0].lstrip("/")
        result.remove.append(Item("container", container["Id"], 0, f"stopped envmgr container {name} "
                                                                 f"({container.get('Image')})"))
    in_use = {c.get("ImageID") for c in containers if c["Id"] not in doomed}

    by_method: dict[str, list[dict]] = {}
    for image in ctx.engine.images(label=paths.LABEL_METHOD):
        labels = image.get("Labels") or {}
        by_method.setdefault(_image_group(labels.get(paths.LABEL_METHOD, ""), labels.get(paths.LABEL_VARIANT)),
                             []).append(image)
    kept_images: list[str] = []
    for method, images in sorted(by_method.items()):
        if only and method.split("/")[0] not in only:
            kept_images += [i["Id"] for i in images]
            continue
        ids = [i["Id"] for i in images]
        if method not in current or current[method] is None:
            kept_images += ids
            why = "method unknown to this base dir" if method not in current else "no base image here to tell"
            result.keep += [Item("image", i, 0, f"{method}: {why}") for i in ids]
            continue
        recency = sorted(images, key=lambda i: _last_tagged(ctx, i["Id"]), reverse=True)
        superseded = 0
        for image in recency:
            label = f"{method} {', '.join(image.get('RepoTags') or []) or image['Id'][:19]}"
            if image["Id"] == current[method]:
                kept_images.append(image["Id"])
                result.keep.append(Item("image", image["Id"], 0, f"{label}: current"))
            elif image["Id"] in in_use:
                kept_images.append(image["Id"])
                result.keep.append(Item("image", image["Id"], 0, f"{label}: used by a container"))
            elif superseded < keep:
                superseded += 1
                kept_images.append(image["Id"])
                result.keep.append(Item("image", image["Id"], 0, f"{label}: one of the {keep} most recent"))
            else:
                result.remove.append(Item("image", image["Id"], 0, f"{label}: superseded"))
    _plan_partials(ctx, result, in_use)
    _count_image_bytes(ctx, result)
    _plan_cache(ctx, result, kept_images, only)
    _plan_image_records(ctx, result, only)
    _plan_caches(ctx, result, only, everything)
    return result


def _plan_partials(ctx: Context, result: Plan, in_use: set) -> None:
    """Partial images an interrupted stepped load left (envmgr/build/load_steps.py); a running build's stay."""
    if build_running(ctx.cache_dir):
        return
    result.remove += [Item("image", image["Id"], 0, "left by an interrupted load (partial image of "
                           f"{(image.get('Labels') or {}).get(paths.LABEL_PARTIAL, '?')[:19]})")
                      for image in ctx.engine.images(label=paths.LABEL_PARTIAL, all_=True)
                      if image["Id"] not in in_use]


def _plan_caches(ctx: Context, result: Plan, only: set[str], everything: bool) -> None:
    """The download caches, base rootfs and lock tools, by caches.py's rule (shared: not with --method)."""
    from envmgr.gc import caches

    if only:
        return
    why_not = caches.busy(ctx)
    if why_not:
        result.keep.append(Item("cache", str(ctx.cache_dir), 0, why_not))
        return
    for trim in caches.plan(ctx, everything):
        result.remove.append(Item("cache", f"{trim.cache}: {len(trim.paths)} entries, {trim.why}", trim.bytes,
                                  trim.why, [str(p) for p in trim.paths]))


def _last_tagged(ctx: Context, image_id: str) -> str:
    info = ctx.engine.inspect_image(image_id) or {}
    return (info.get("Metadata") or {}).get("LastTagTime") or ""


def _count_image_bytes(ctx: Context, result: Plan) -> None:
    """The bytes removing these images frees: layers that no remaining image (of any kind) has."""
    removed = [item for item in result.remove if item.kind == "image"]
    if not removed:
        return
    doomed = {item.what for item in removed}
    kept_chains: set[str] = set()
    for image in ctx.engine.images(all_=True):
        if image["Id"] not in doomed:
            kept_chains.update(chain for chain, _ in (image_layers(ctx, image["Id"]) or []))
    counted: set[str] = set()
    for item in removed:
        layers = image_layers(ctx, item.what)
        if layers is None:  # fall back to the engine's own figure for this image alone
            image = next((i for i in ctx.engine.image_disk_usage() if i["Id"] == item.what), {})
            item.bytes = max(0, int(image.get("Size", 0)) - max(0, int(image.get("SharedSize", 0))))
            continue
        for chain, size in layers:
            if chain not in kept_chains and chain not in counted:
                counted.add(chain)
                item.bytes += size


def _plan_cache(ctx: Context, result: Plan, kept_images: list[str], only: set[str]) -> None:
    cache = ctx.cache_dir
    used: set[str] = set()
    for image_id in set(kept_images) | {i["Id"] for i in ctx.engine.images(label=paths.LABEL_KIND)
                                        if i["Id"] not in {r.what for r in result.remove if r.kind == "image"}}:
        info = ctx.engine.inspect_image(image_id) or {}
        used.update((info.get("RootFS") or {}).get("Layers") or [])
    layers = cache / "layers"
    if layers.is_dir():
        for path in sorted(layers.iterdir()):
            if path.name.endswith(".partial"):
                if not build_running(cache):
                    result.remove.append(Item("layer", str(path), _size(path), "unfinished layer"))
                continue
            match = LAYER_FILE.match(path.name)
            if not match or match.group(4) != "tar" or (only and match.group(2) not in only):
                continue
            diff_id = _diff_id(path)
            if diff_id in used:
                continue
            result.remove.append(Item("layer", str(path), _size(path), "no kept image uses this layer"))
            record = path.with_suffix(".json")
            if record.is_file():
                result.remove.append(Item("layer", str(record), _size(record), "its layer's record"))
    _plan_store(ctx, result, used)
    if build_running(cache):
        result.keep.append(Item("work", str(cache / "work"), 0, "a build is running"))
        return
    with shared_uv_cache(cache):   # a uv cache a killed build left in its stage goes home before the stage goes
        pass
    for folder in ("work", "envs"):
        root = cache / folder
        if root.is_dir():
            for path in sorted(root.iterdir()):
                if only and not any(path.name.startswith((f"{m}-", f"method-{m}-")) for m in only):
                    continue
                result.remove.append(Item("work", str(path), _size(path), "left over by an interrupted build"))


def _plan_image_records(ctx: Context, result: Plan, only: set[str]) -> None:
    """SBOMs and signature records kept per image ID: removed once their image is gone (or goes in this gc)."""
    removed_images = {item.what for item in result.remove if item.kind == "image"}
    building = build_running(ctx.cache_dir)   # a build writes its SBOM before it loads the image
    for kind, folder, suffix in IMAGE_RECORDS:
        root = ctx.cache_dir / folder
        for path in sorted(root.iterdir()) if root.is_dir() else []:
            image_id = _record_image(path, suffix)
            if image_id is None:
                continue
            if image_id in removed_images:
                why = "its image is removed by this gc"
            elif ctx.engine.image_id(image_id) is None and not building:
                why = "its image is gone"
            else:
                continue
            if only and _record_method(path, kind) not in only:
                continue
            result.remove.append(Item(kind, str(path), _size(path), f"{kind} of {image_id[:19]}: {why}"))


def _record_image(path: Path, suffix: str) -> str | None:
    """`sha256:<hex>` of a record file named `<hex><suffix>`; None for anything else (temp files)."""
    stem = path.name[:-len(suffix)] if path.name.endswith(suffix) else ""
    return f"sha256:{stem}" if IMAGE_ID_HEX.match(stem) and path.is_file() and not path.is_symlink() else None


def _record_method(path: Path, kind: str) -> str | None:
    """The method an SBOM (its root component's envmgr:method) or a signature record (its statement) names."""
    try:
        data = json.loads(path.read_text())
        if kind == "sbom":
            properties = data["metadata"]["component"].get("properties") or []
            return next((p.get("value") for p in properties if p.get("name") == "envmgr:method"), None)
        return json.loads(base64.b64decode(data["statement"])).get("method")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _plan_store(ctx: Context, result: Plan, used: set[str]) -> None:
    """Layer store entries (shared by methods) that no remaining image uses, with their group records.

    Left alone while any build runs: a build's new layers are in no image until it loads them.
    """
    store = LayerStore(ctx.cache_dir / "store")
    if not store.layers.is_dir():
        return
    if build_running(ctx.cache_dir):
        result.keep.append(Item("layer", str(store.layers), 0, "a build is running"))
        return
    records = store.recorded_diff_ids()
    for path in sorted(store.layers.iterdir()):
        if path.name.startswith(".new-"):
            result.remove.append(Item("layer", str(path), _size(path), "unfinished layer"))
            continue
        diff_id = "sha256:" + path.name
        if diff_id in used:
            if _size(path) >= RELEASE_BYTES:   # stored before builds handed large layers to the engine
                result.remove.append(Item("layer-copy", str(path), _size(path),
                                          "a second copy: a kept image holds this layer in the engine"))
            continue
        result.remove.append(Item("layer", str(path), _size(path), "no kept image uses this stored layer"))
        for record in records.get(diff_id, []):
            result.remove.append(Item("layer", str(record), _size(record), "its layer's record"))
    for diff_id, found in records.items():   # records of layers handed to the engine, which no longer has them
        if diff_id not in used and not store.layer_path(diff_id).exists():
            result.remove.extend(Item("layer", str(record), _size(record), "its layer left the engine")
                                 for record in found)


def _diff_id(tar: Path) -> str:
    record = tar.with_suffix(".json")
    if record.is_file():
        try:
            known = json.loads(record.read_text())
            if known.get("size") == tar.stat().st_size:
                return known["diff_id"]
        except (ValueError, KeyError):
            pass
    return "sha256:" + file_sha256(tar)[0]


def _size(path: Path) -> int:
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if not p.is_dir() or p.is_symlink())


def apply(ctx: Context, result: Plan) -> Plan:
    """Remove what the plan says; what the engine refuses (in use meanwhile) moves to `keep`."""
    done = Plan(keep=list(result.keep))
    for item in result.remove:
        try:
            if item.kind == "container":
                ctx.engine.remove_container(item.what)
            elif item.kind in ("sbom", "signature"):
                image_id = _record_image(Path(item.what), next(s for k, _, s in IMAGE_RECORDS if k == item.kind))
                if image_id and ctx.engine.image_id(image_id):   # loaded again meanwhile (an import): keep it
                    done.keep.append(Item(item.kind, item.what, 0, "its image is in the engine again"))
                    continue
                Path(item.what).unlink(missing_ok=True)
            elif item.kind == "image":
                tags = (ctx.engine.inspect_image(item.what) or {}).get("RepoTags") or []
                for tag in tags:
                    ctx.engine.remove_image(tag)
                if ctx.engine.image_id(item.what):
                    ctx.engine.remove_image(item.what)
            elif item.kind == "cache":
                from envmgr.gc.caches import held

                with held(ctx.cache_dir) as free:   # no lock or build step starts using a cache meanwhile
                    if not free:
                        done.keep.append(Item(item.kind, item.what, 0, "a step is using the caches now"))
                        continue
                    for entry in map(Path, item.paths):
                        if entry.is_dir() and not entry.is_symlink():
                            shutil.rmtree(entry, ignore_errors=True)
                        else:
                            entry.unlink(missing_ok=True)
            elif item.kind == "layer-copy":   # the record stays, marked released; the bytes go
                path = Path(item.what)
                LayerStore(path.parent.parent).release(["sha256:" + path.name])
            else:
                path = Path(item.what)
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
        except EngineError as exc:
            done.keep.append(Item(item.kind, item.what, 0, f"the engine refused: {exc.message}"))
            continue
        done.remove.append(item)
    return done
