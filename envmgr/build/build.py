"""`envmgr build`: base layer + environment layer + method layer, assembled by envmgr and loaded
through the Engine API, tagged by the content hash of its inputs."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import threading
import time
from dataclasses import dataclass

from envmgr.build.load_steps import load_in_steps, remove_partials, steps
from envmgr.build.sonames import check_image
from envmgr.build.target import BuildTarget, build_running, env_record, is_layered, target
from envmgr.core.errors import EngineError, EnvmgrError
from envmgr.core.files import atomic_write, open_lock
from envmgr.core.spec import MethodSpec
from envmgr.door.context import Context
from envmgr.door.engine import ImageGone
from envmgr.images.base import ensure_base
from envmgr.images.image import CountingWriter, ImageConfig, archive_pieces, pieces_size, write_archive
from envmgr.lock.backends import get_backend


@dataclass
class BuildResult:
    method: str
    image_id: str
    tag: str
    inputs_hash: str
    lock_hash: str
    reused: bool
    seconds: float


























def build(ctx: Context, spec: MethodSpec, *, force: bool = False) -> BuildResult:
    started = time.monotonic()
    backend = get_backend(spec)
    backend.check(spec)
    base = ensure_base(ctx, spec.base_image)
    if base.python_version and not base.python_version.startswith(spec.python + "."):
        raise EnvmgrError(f"{spec.name}: wants Python {spec.python} but base image {spec.base_image} has "
                          f"{base.python_version}")
    wanted = target(ctx, spec, base)
    data, digest, tag = wanted.inputs, wanted.digest, wanted.tag
    existing = None if force else ctx.engine.image_id(tag)
    if existing:
        ctx.engine.tag(existing, spec.image_repository, "latest")
        return BuildResult(spec.name, existing, tag, digest, data["lock"], True, time.monotonic() - started)

    locks = ctx.cache_dir / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open_lock(locks / f"build-{spec.name}.lock") as guard:
        if not _try_lock(guard):
            ctx.ui.step(f"another build of {spec.name} is running: waiting for it")
            fcntl.flock(guard, fcntl.LOCK_EX)
        existing = None if force else ctx.engine.image_id(tag)
        if existing:
            ctx.engine.tag(existing, spec.image_repository, "latest")
            return BuildResult(spec.name, existing, tag, digest, data["lock"], True, time.monotonic() - started)
        image_id = _assemble_or_say_disk_full(ctx, wanted)
    check_image(ctx, spec, base, data, image_id)     # system libraries the environment needs and the image lacks
    return BuildResult(spec.name, image_id, tag, digest, data["lock"], False, time.monotonic() - started)


def _assemble_or_say_disk_full(ctx: Context, wanted: BuildTarget) -> str:
    """A full disk is one line that says so (in envmgr's own writes or an install container's)."""
    spec, tag = wanted.spec, wanted.tag
    try:
        return _assemble(ctx, wanted)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = exc.filename or ctx.cache_dir
    except EnvmgrError as exc:
        if "No space left on device" not in exc.message:
            raise
        where = ctx.cache_dir
    raise EnvmgrError(f"{spec.name}: disk full while building {tag} (in {where}): nothing was tagged",
                      hint="free space there, or set cache_dir (ENVMGR_CACHE_DIR) to a larger disk")


def _try_lock(guard) -> bool:
    try:
        fcntl.flock(guard, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False






















def _assemble(ctx: Context, wanted: BuildTarget) -> str:
    with contextlib.ExitStack() as defer:   # new large layers go from their staging trees into the engine
        return _assemble_in(ctx, wanted, defer)


def _assemble_in(ctx: Context, wanted: BuildTarget, defer: contextlib.ExitStack) -> str:
    tag = wanted.tag
    ctx.ui.step(f"building {tag}")
    config = wanted.config(ctx, defer=defer)
    present = ctx.engine.present_layers([layer.diff_id for layer in config.layers])
    lacking = _lacking_bytes(config, present)
    if lacking:
        # their bytes went to the engine, which holds them on another chain (or lost them): make them again
        ctx.ui.step(f"{len(lacking)} environment layer(s) are not in the engine below this image: making "
                    "them again")
        config = wanted.config(ctx, need_bytes=lacking, defer=defer)
        present = ctx.engine.present_layers([layer.diff_id for layer in config.layers])
        if _lacking_bytes(config, present):
            raise EnvmgrError(f"{wanted.spec.name}: environment layers left the engine during the build "
                              "(a concurrent gc?)", hint="run the build again")
    layers = config.layers
    image_id = _load(ctx, config, present)
    if ctx.engine.image_id(image_id) != image_id:
        raise EnvmgrError(f"the engine did not report image {image_id} after loading it")
    from envmgr.build.sbom import sbom_bytes

    sbom_bytes(ctx, wanted.spec, wanted.base, config)   # beside the image in the cache, before the tag names it
    repository, short = tag.rsplit(":", 1)
    try:
        ctx.engine.tag(image_id, repository, short)
    except ImageGone:   # removed between the load and the tag (a gc, another build's cleanup): load it again
        ctx.ui.warn(f"image {image_id[:19]} left the engine before it was tagged: loading it again")
        _load(ctx, config, ctx.engine.present_layers([layer.diff_id for layer in layers]))   # shared layers stayed
        ctx.engine.tag(image_id, repository, short)
    ctx.engine.tag(image_id, repository, "latest")
    if not build_running(ctx.cache_dir, besides=f"build-{wanted.spec.name}.lock"):
        remove_partials(ctx.engine)   # what an interrupted stepped load left (no build here is loading now)
    _hand_over(ctx, wanted, config)
    return image_id


def _lacking_bytes(config: ImageConfig, present: frozenset[str]) -> frozenset[str]:
    """Diff IDs the load must send (the engine lacks their chain) but that have no file here."""
    return frozenset(layer.diff_id for layer in config.layers
                     if layer.diff_id not in present and not layer.path.is_file() and not layer.trees)


def _load(ctx: Context, config: ImageConfig, present: frozenset[str]) -> str:
    """Load the image, sending only the layers the engine lacks; an engine that refuses a partial archive
    gets every layer's bytes when they are all here."""
    try:
        return _stream_load(ctx, config, present)
    except EngineError:
        if not present or _lacking_bytes(config, frozenset()):
            raise
        return _stream_load(ctx, config, frozenset())


def _hand_over(ctx: Context, wanted: BuildTarget, config: ImageConfig) -> None:
    """The engine holds the environment layers now: drop the store's copies of the large ones (the
    environment is not kept twice). Skipped while another build runs (it may be reading them)."""
    from envmgr.build.layers import RELEASE_BYTES, store_for

    if build_running(ctx.cache_dir, besides=f"build-{wanted.spec.name}.lock"):
        ctx.ui.log("another build is running: the stored environment layers stay until the next build or gc")
        return
    env = [layer for layer in config.layers[1:-1] if layer.path.is_file()]
    freed = store_for(ctx).release([layer.diff_id for layer in env])
    if not is_layered(wanted.spec):
        record = env_record(ctx, wanted.spec, wanted.inputs)
        tar = record.with_suffix(".tar")
        if tar.is_file() and tar.stat().st_size >= RELEASE_BYTES:
            try:
                known = json.loads(record.read_text())
            except (OSError, ValueError):
                known = None
            if isinstance(known, dict) and any(layer.diff_id == known.get("diff_id") for layer in env):
                atomic_write(record, json.dumps({**known, "released": True, "stamp": None}))
                freed += tar.stat().st_size
                tar.unlink()
    if freed:
        ctx.ui.step(f"environment layers are in the engine now: {freed / 1e9:.1f} GB of stored copies dropped")


def _stream_load(ctx: Context, config: ImageConfig, present: frozenset[str]) -> str:
    """Send the archive to the engine without writing it anywhere: its file contents by sendfile(2) on the
    engine's unix socket (never through Python: the engine's own load is then the cost, about a third
    less time than a pipe, measured in tests/bench/load_paths_bench.py), else written into a pipe.
    Large images go in overlapping steps (load_steps.py: the engine registers one group of layers while the
    next arrives; ENVMGR_LOAD_STEP_BYTES=0 turns them off), one archive as the fallback."""
    total = sum(layer.size for layer in config.layers if layer.diff_id not in present)
    if ctx.engine.can_send_files():
        title = (f"loading the image into the engine ({len(present)} of {len(config.layers)} layers already "
                 "there)")
        if len(steps(config, present)) > 1:
            try:
                with ctx.ui.progress(title, total=total, unit="bytes") as task:
                    return load_in_steps(ctx.engine, config, present, progress=task.advance)
            except EngineError as exc:   # the one-archive load below is the fallback
                ctx.ui.warn(f"loading in steps failed ({exc.message}): loading the image as one archive")
        pieces = archive_pieces(config, [], present)
        with ctx.ui.progress(title, total=total, unit="bytes") as task:
            ctx.engine.load_files(pieces, pieces_size(pieces), progress=task.advance)
        remove_partials(ctx.engine, config.image_id())   # what failed steps left
        return config.image_id()
    read_end, write_end = os.pipe()
    result: dict = {}

    def produce() -> None:
        try:
            with os.fdopen(write_end, "wb", buffering=1 << 20) as sink:
                # tarfile asks where it is (tell), which a pipe cannot answer: count the bytes instead
                # the engine checks every layer's diff ID as it registers it: no second hash here
                result["id"] = write_archive(CountingWriter(sink), config, [], progress=task.advance,
                                             verify_measured=False,
                                             present=present)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer below
            result["error"] = exc

    source = os.fdopen(read_end, "rb", buffering=0)

    def chunks():
        while chunk := source.read(1 << 20):
            yield chunk

    skipped = len(present)
    with ctx.ui.progress(f"loading the image into the engine ({skipped} of {len(config.layers)} layers already "
                         "there)", total=total, unit="bytes") as task:
        producer = threading.Thread(target=produce, daemon=True)
        producer.start()
        try:
            ctx.engine.load_archive(chunks())
        finally:
            source.close()   # a writer still going gets a broken pipe and stops
            producer.join()
    if "error" in result and not isinstance(result["error"], BrokenPipeError):
        raise result["error"]
    return result["id"]


def export_archive(ctx: Context, spec: MethodSpec, out) -> str:
    """Write the method's current image as a docker-archive (used by tests and `export`)."""
    wanted = target(ctx, spec)
    return write_archive(out, wanted.config(ctx), [wanted.tag])
