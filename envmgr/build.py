"""`envmgr build`: base layer + environment layer + method layer, assembled by envmgr and loaded
through the Engine API, tagged by the content hash of its inputs."""

from __future__ import annotations

import errno
import fcntl
import fnmatch
import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from . import __version__, paths
from .backends import entry_command, get_backend
from .base import BaseImage, ensure_base
from .context import Context
from .errors import EngineError, EnvmgrError
from .image import ExtraFile, HashingWriter, ImageConfig, Layer, tree_hash, write_archive, write_layer
from .spec import MethodSpec

# Bump when the layout of the layers changes: it is part of every inputs hash.
LAYOUT_VERSION = "3"
DEFAULT_EXCLUDES = [".git", ".git/*", "*/__pycache__", "*/__pycache__/*", "__pycache__", "*.pyc",
                    ".venv*", ".mypy_cache", ".pytest_cache", ".DS_Store", "*/.DS_Store"]


@dataclass
class BuildResult:
    method: str
    image_id: str
    tag: str
    inputs_hash: str
    lock_hash: str
    reused: bool
    seconds: float


def _excluded(spec: MethodSpec):
    patterns = DEFAULT_EXCLUDES + spec.exclude

    def excluded(rel: str) -> bool:
        return any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(rel.split("/")[-1], p) for p in patterns)

    return excluded


def lock_hash(ctx: Context, spec: MethodSpec) -> str:
    sha = hashlib.sha256()
    for path in get_backend(spec).lock_files(spec):
        sha.update(path.name.encode() + b"\0")
        sha.update(path.read_bytes() if path.is_file() else b"<missing>")
    return sha.hexdigest()


def installer_id(ctx: Context) -> str:
    """The installers' versions: part of every inputs hash (and checked by `import`)."""
    return f"uv {uv_version(ctx)}, py-rattler {_version_of('py-rattler')}"


def uv_version(ctx: Context) -> str:
    try:
        from importlib.metadata import version

        return version("uv")
    except Exception:  # noqa: BLE001 - any uv on PATH is still fine; its bytes are hashed then
        return hashlib.sha256(ctx.uv_binary().read_bytes()).hexdigest()[:16]


def _version_of(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return "absent"


def inputs(ctx: Context, spec: MethodSpec, base: BaseImage) -> dict[str, str]:
    """Everything the image depends on. Mirrors are deliberately absent: where is not what."""
    return {
        "layout": LAYOUT_VERSION,
        "base": base.image_id,
        "lock": lock_hash(ctx, spec),
        "spec": spec.spec_hash(),
        "method_files": tree_hash(spec.source_path, _excluded(spec)),
        "installer": installer_id(ctx),
        "shim": hashlib.sha256(_shim()).hexdigest(),
    }


def _digest(data: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _shim() -> bytes:
    return resources.files("envmgr").joinpath("data/conda-shim.sh").read_bytes()


def image_tag(spec: MethodSpec, inputs_hash: str) -> str:
    return f"{spec.image_repository}:{inputs_hash[:16]}"


def build(ctx: Context, spec: MethodSpec, *, force: bool = False) -> BuildResult:
    started = time.monotonic()
    backend = get_backend(spec)
    backend.check(spec)
    base = ensure_base(ctx, spec.base_image)
    if base.python_version and not base.python_version.startswith(spec.python + "."):
        raise EnvmgrError(f"{spec.name}: wants Python {spec.python} but base image {spec.base_image} has "
                          f"{base.python_version}")
    data = inputs(ctx, spec, base)
    digest = _digest(data)
    tag = image_tag(spec, digest)
    existing = None if force else ctx.engine.image_id(tag)
    if existing:
        ctx.engine.tag(existing, spec.image_repository, "latest")
        return BuildResult(spec.name, existing, tag, digest, data["lock"], True, time.monotonic() - started)

    locks = ctx.cache_dir / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"build-{spec.name}.lock", "w") as guard:
        if not _try_lock(guard):
            ctx.ui.step(f"another build of {spec.name} is running: waiting for it")
            fcntl.flock(guard, fcntl.LOCK_EX)
        existing = None if force else ctx.engine.image_id(tag)
        if existing:
            ctx.engine.tag(existing, spec.image_repository, "latest")
            return BuildResult(spec.name, existing, tag, digest, data["lock"], True, time.monotonic() - started)
        image_id = _assemble_or_say_disk_full(ctx, spec, base, data, digest, tag)
    return BuildResult(spec.name, image_id, tag, digest, data["lock"], False, time.monotonic() - started)


def _assemble_or_say_disk_full(ctx: Context, spec: MethodSpec, base: BaseImage, data: dict[str, str], digest: str,
                               tag: str) -> str:
    """A full disk is one line that says so (in envmgr's own writes or an install container's)."""
    try:
        return _assemble(ctx, spec, base, data, digest, tag)
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


def env_layer(ctx: Context, spec: MethodSpec, base: BaseImage, data: dict[str, str]) -> Layer:
    """The installed environment as a layer, cached by what determines it (lock, base, installer)."""
    env_key = _digest({"layout": data["layout"], "base": data["base"], "lock": data["lock"],
                       "installer": data["installer"], "prefix": spec.env_prefix})[:32]
    layers = ctx.cache_dir / "layers"
    layers.mkdir(parents=True, exist_ok=True)
    record = layers / f"env-{spec.name}-{env_key}.json"
    tar = layers / f"env-{spec.name}-{env_key}.tar"
    if record.is_file() and tar.is_file():
        cached = _cached_layer(ctx, record, tar)
        if cached is not None:
            return cached
    prefix_root = ctx.cache_dir / "envs"
    prefix_root.mkdir(parents=True, exist_ok=True)
    prefix = Path(tempfile.mkdtemp(dir=prefix_root, prefix=f"{spec.name}-"))
    try:
        get_backend(spec).install(ctx, spec, base, prefix)
        total = sum(p.lstat().st_size for p in prefix.rglob("*") if p.is_file() and not p.is_symlink())
        with ctx.ui.progress("writing the environment layer", total=total, unit="bytes") as task:
            layer = write_layer(tar, trees=[(prefix, spec.env_prefix)], progress=task.advance)
    finally:
        shutil.rmtree(prefix, ignore_errors=True)
        tar.with_name(tar.name + ".partial").unlink(missing_ok=True)
    _write_record(record, layer.diff_id, layer.size, tar)
    return layer


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _cached_layer(ctx: Context, record: Path, tar: Path) -> Layer | None:
    """The cached layer if its bytes still hash to its recorded diff ID; else None (it is made again).

    A layer untouched since it was written (same size, mtime and inode as recorded) is reused without
    reading it, so a method-file rebuild of a multi-GB environment stays fast; any other is hashed.
    """
    from .image import file_sha256

    try:
        known = json.loads(record.read_text())
        diff_id, size = str(known["diff_id"]), int(known["size"])
    except (OSError, ValueError, KeyError, TypeError):
        ctx.ui.warn(f"cached layer record {record.name} is unreadable: making the layer again")
        return None
    if known.get("stamp") != _stamp(tar):
        if tar.stat().st_size != size or "sha256:" + file_sha256(tar)[0] != diff_id:
            ctx.ui.warn(f"cached layer {tar.name} is damaged (its bytes do not hash to {diff_id[:19]}): "
                        "making it again")
            return None
        _write_record(record, diff_id, size, tar)
    ctx.ui.step(f"environment layer for this lock is cached ({size / 1e6:.0f} MB)")
    return Layer(path=tar, diff_id=diff_id, size=size)


def _write_record(record: Path, diff_id: str, size: int, tar: Path) -> None:
    tmp_record = record.with_name(record.name + ".partial")
    tmp_record.write_text(json.dumps({"diff_id": diff_id, "size": size, "stamp": _stamp(tar)}))
    os.replace(tmp_record, record)   # a build killed here leaves no half-written record


def method_info(spec: MethodSpec, data: dict[str, str]) -> dict:
    return {"name": spec.name, "backend": spec.backend, "env_prefix": spec.env_prefix, "entry": spec.entry,
            "method_dir": paths.CONTAINER_METHOD_DIR, "gpu": spec.gpu, "default_model": spec.default_model,
            "envmgr": __version__, "inputs": data}


def method_layer(ctx: Context, spec: MethodSpec, data: dict[str, str], digest: str) -> Layer:
    excluded = _excluded(spec)
    staging_root = ctx.cache_dir / "work"
    staging_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=staging_root, prefix=f"method-{spec.name}-") as staging:
        files = Path(staging) / "method"
        shutil.copytree(spec.source_path, files, symlinks=True,
                        ignore=lambda d, names: [n for n in names
                                                 if excluded(str(Path(d, n).relative_to(spec.source_path)))])
        for path in [files, *files.rglob("*")]:
            if not path.is_symlink():
                path.chmod(0o755 if path.is_dir() or path.stat().st_mode & 0o111 else 0o644)
        extras = [
            ExtraFile("usr/local/bin/conda", _shim(), 0o755),
            ExtraFile(paths.CONTAINER_METHOD_INFO.lstrip("/"),
                      json.dumps(method_info(spec, data), indent=1, sort_keys=True).encode()),
        ]
        return write_layer(ctx.cache_dir / "layers" / f"method-{spec.name}-{digest[:32]}.tar",
                           trees=[(files, paths.CONTAINER_METHOD_DIR)], extra_files=extras)


def image_config(spec: MethodSpec, base: BaseImage, layers: list[Layer], data: dict[str, str],
                 digest: str) -> ImageConfig:
    env = {
        "PATH": f"{spec.env_prefix}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "VIRTUAL_ENV": spec.env_prefix,
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "NVIDIA_VISIBLE_DEVICES": "all",
        "NVIDIA_DRIVER_CAPABILITIES": "compute,utility",
        "ENVMGR_METHOD": spec.name,
        **spec.env,
    }
    labels = {
        paths.LABEL_MANAGED: "true", paths.LABEL_KIND: "method", paths.LABEL_METHOD: spec.name,
        paths.LABEL_INPUTS: digest, paths.LABEL_LOCK: data["lock"], paths.LABEL_SPEC: data["spec"],
        paths.LABEL_BASE: base.image_id,
    }
    return ImageConfig(
        layers=layers, env=env, cmd=entry_command(spec, spec.entry), workdir=paths.CONTAINER_METHOD_DIR, labels=labels,
        history=[f"envmgr base {spec.base_image}", f"envmgr environment {spec.name} ({spec.backend} lock "
                 f"{data['lock'][:16]})", f"envmgr method files {spec.name}"],
    )


def _assemble(ctx: Context, spec: MethodSpec, base: BaseImage, data: dict[str, str], digest: str, tag: str) -> str:
    ctx.ui.step(f"building {tag}")
    layers = [base.layer, env_layer(ctx, spec, base, data), method_layer(ctx, spec, data, digest)]
    config = image_config(spec, base, layers, data, digest)
    present = ctx.engine.present_layers([layer.diff_id for layer in layers])
    try:
        image_id = _stream_load(ctx, config, present)
    except EngineError:
        if not present:
            raise
        image_id = _stream_load(ctx, config, frozenset())   # an engine that wants every layer's bytes
    if ctx.engine.image_id(image_id) != image_id:
        raise EnvmgrError(f"the engine did not report image {image_id} after loading it")
    from .sbom import sbom_bytes

    sbom_bytes(ctx, spec, base, config)   # beside the image in the cache, before the tag names it
    repository, short = tag.rsplit(":", 1)
    ctx.engine.tag(image_id, repository, short)
    ctx.engine.tag(image_id, repository, "latest")
    return image_id


def _stream_load(ctx: Context, config: ImageConfig, present: frozenset[str]) -> str:
    """Write the archive into a pipe that the engine reads: no archive file on disk."""
    total = sum(layer.size for layer in config.layers if layer.diff_id not in present)
    read_end, write_end = os.pipe()
    result: dict = {}

    def produce() -> None:
        try:
            with os.fdopen(write_end, "wb", buffering=1 << 20) as sink:
                # tarfile asks where it is (tell), which a pipe cannot answer: count the bytes instead
                result["id"] = write_archive(HashingWriter(sink), config, [], progress=task.advance,
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
    base = ensure_base(ctx, spec.base_image)
    data = inputs(ctx, spec, base)
    digest = _digest(data)
    layers = [base.layer, env_layer(ctx, spec, base, data), method_layer(ctx, spec, data, digest)]
    return write_archive(out, image_config(spec, base, layers, data, digest), [image_tag(spec, digest)])


def target(ctx: Context, spec: MethodSpec, base: BaseImage | None = None) -> tuple[BaseImage, dict[str, str], str, str]:
    """What `build` would make now, without building: the base, the inputs, their hash and the image tag."""
    base = base or ensure_base(ctx, spec.base_image)
    data = inputs(ctx, spec, base)
    digest = _digest(data)
    return base, data, digest, image_tag(spec, digest)


def config_for(ctx: Context, spec: MethodSpec, base: BaseImage, data: dict[str, str], digest: str) -> ImageConfig:
    """The image config of these inputs, its layers taken from the cache (or made again when missing)."""
    layers = [base.layer, env_layer(ctx, spec, base, data), method_layer(ctx, spec, data, digest)]
    return image_config(spec, base, layers, data, digest)
