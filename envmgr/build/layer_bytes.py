"""Layer bytes read back from the engine (issue 16: the environment is not kept twice).

Once an image is loaded, the layer store drops its copies of the large environment layers
(`LayerStore.release`); the engine's copy is the only one. What needs those bytes again as files
(`export`, the squashfs export, an SBOM whose facts are not cached) reads them back from the engine
with `docker save`: the engine re-assembles each layer tar byte for byte (its tar-split metadata), so
the bytes hash to the same diff ID. Each one is checked by hash; a mismatch is an error, never used.

The copies live in a temporary folder under the cache for as long as the caller needs them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from envmgr.door.context import Context

if TYPE_CHECKING:
    from envmgr.build.target import BuildTarget
from envmgr.core.errors import EnvmgrError
from envmgr.images.image import ImageConfig, Layer, save_layers


@contextlib.contextmanager
def with_layer_files(ctx: Context, config: ImageConfig, image_id: str,
                     skip: frozenset[str] = frozenset()) -> Iterator[ImageConfig]:
    """`config` with a file behind every layer (but those in `skip`): missing ones read back from the
    engine's image `image_id` into a temporary folder, removed when the block ends."""
    missing: dict[str, int | None] = {layer.diff_id: layer.size if layer.size >= 0 else None
                                      for layer in config.layers
                                      if layer.diff_id not in skip and not layer.path.is_file()}
    if not missing:
        yield config
        return
    work = ctx.cache_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    total = sum(size or 0 for size in missing.values()) or engine_size(ctx, image_id)
    free = shutil.disk_usage(work).free
    if free < total + (64 << 20):
        raise EnvmgrError(f"reading {len(missing)} layer(s) back from the engine needs {total / 1e9:.1f} GB in "
                          f"{work}; {free / 1e9:.1f} GB free", hint="free space there, or set cache_dir "
                          "(ENVMGR_CACHE_DIR) to a larger disk")
    with tempfile.TemporaryDirectory(dir=work, prefix="from-engine-") as scratch:
        with ctx.ui.progress(f"reading {len(missing)} layer(s) back from the engine ({total / 1e9:.1f} GB; the "
                             "store keeps no second copy)", total=None, unit="bytes") as task:
            def counted() -> Iterator[bytes]:
                for chunk in ctx.engine.save_image(image_id):
                    task.advance(len(chunk))
                    yield chunk

            found = save_layers(counted(), missing, Path(scratch))
        lost = sorted(set(missing) - set(found))
        if lost:
            raise EnvmgrError(f"the engine's image {image_id[:19]} did not give back layer(s) "
                              f"{', '.join(d[:19] for d in lost)} with their recorded bytes",
                              hint="rebuild the image (`envmgr build --force METHOD`)")
        layers = [dataclasses.replace(layer, path=found[layer.diff_id], size=found[layer.diff_id].stat().st_size)
                  if layer.diff_id in found else layer for layer in config.layers]
        yield dataclasses.replace(config, layers=layers)


def engine_size(ctx: Context, image_id: str) -> int:
    return int((ctx.engine.inspect_image(image_id) or {}).get("Size") or 0)


def engine_config(ctx: Context, image_id: str, local: dict[str, Path],
                  sizes: dict[str, int] | None = None) -> ImageConfig | None:
    """The engine's image `image_id` as envmgr's ImageConfig, when its bytes make that very ID (an image
    envmgr assembled); None otherwise. Layers get their file from `local` (diff ID -> tar) when there,
    else none until `with_layer_files` reads them back from the engine (size from `sizes`, else -1: unknown).

    So `export` and friends need neither the layer store nor an index: what the engine holds is enough
    (a server that imported the image and never reached an index can export it again)."""
    attrs = ctx.engine.inspect_image(image_id)
    history = ctx.engine.image_history(image_id)
    if not attrs or history is None:
        return None
    settings = attrs.get("Config") or {}
    diff_ids = (attrs.get("RootFS") or {}).get("Layers") or []
    sizes = sizes or {}
    nowhere = Path("/nonexistent")
    layers = [Layer(path=local[d], diff_id=d, size=local[d].stat().st_size) if d in local and local[d].is_file()
              else Layer(path=nowhere / d.removeprefix("sha256:"), diff_id=d, size=sizes.get(d, -1))
              for d in diff_ids]
    env = dict(item.split("=", 1) for item in settings.get("Env") or [] if "=" in item)
    config = ImageConfig(layers=layers, env=env, cmd=settings.get("Cmd") or None,
                         entrypoint=settings.get("Entrypoint") or None, workdir=settings.get("WorkingDir") or None,
                         labels=dict(settings.get("Labels") or {}),
                         history=[str(entry.get("CreatedBy", "")) for entry in reversed(history)],
                         architecture=str(attrs.get("Architecture") or "amd64"))
    return config if config.image_id() == image_id else None


def exported_config(ctx: Context, wanted: BuildTarget, image_id: str) -> ImageConfig:
    """The image config an export of `image_id` writes: the engine's (no index, no install needed), with
    local files for the layers envmgr still has; else made from the cache, which must give the same ID."""
    from envmgr.build.layers import store_for

    store = store_for(ctx)
    local = {f"sha256:{path.name}": path for path in store.layers.iterdir()} if store.layers.is_dir() else {}
    local[wanted.base.diff_id] = Path(wanted.base.layer_path)
    config = engine_config(ctx, image_id, local, store.recorded_sizes())
    if config is not None:
        return config
    config = wanted.config(ctx)
    if config.image_id() != image_id:
        raise EnvmgrError(f"{wanted.spec.name}: the cached layers make {config.image_id()[:19]}, not the engine's "
                          f"{image_id[:19]} for {wanted.tag}",
                          hint=f"rebuild with `envmgr build --force {wanted.spec.name}`")
    return config
