"""What a build makes, without making it: the inputs of a method's image and their hash, its tag, the
cached environment layer records, the method layer and the image config; and the build locks gc honours.

A library: the `build` verb (envmgr.build.build), gc, sbom, transfer, registry, verify and the runs import
it; it imports no verb.
"""


from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from envmgr import __version__
from envmgr.build.gpu_image import image_labels as gpu_image_labels, lock_facts, read_archs
from envmgr.build.layer_facts import LABEL as LAYER_FACTS, VERSION as LAYER_FACTS_VERSION, ImageFacts, LayerFacts
from envmgr.build.layers import PHYSICAL_PREFIX, EnvLayers, build_env_layers
from envmgr.build.system_layer import history as system_history, system_key, system_layer
from envmgr.core import paths
from envmgr.core.errors import UsageError
from envmgr.core.files import atomic_write, open_lock
from envmgr.core.spec import MethodSpec
from envmgr.door.context import Context
from envmgr.images.base import BaseImage, ensure_base
from envmgr.images.image import ExtraFile, ImageConfig, Layer, tree_hash, write_layer
from envmgr.lock.backends import entry_command, get_backend

# Bump when the layout of the layers changes: it is part of every inputs hash.
LAYOUT_VERSION = "4"   # 4: per-distribution environment layers in a shared prefix (issue 14)


DEFAULT_EXCLUDES = [".git", ".git/*", "*/__pycache__", "*/__pycache__/*", "__pycache__", "*.pyc",
                    ".venv*", ".mypy_cache", ".pytest_cache", ".DS_Store", "*/.DS_Store"]


def method_excludes(spec: MethodSpec):
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
        "method_files": tree_hash(spec.source_path, method_excludes(spec)),
        "installer": installer_id(ctx),
        "shim": hashlib.sha256(_shim()).hexdigest(),
        "layer_facts": str(LAYER_FACTS_VERSION),   # what the image's labels record (the image ID depends on it)
        **({"system": system_key(spec, base)} if spec.system.apt else {}),   # [system] apt: its own layer
    }


def inputs_digest(data: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _shim() -> bytes:
    return resources.files("envmgr").joinpath("data/conda-shim.sh").read_bytes()


def image_tag(spec: MethodSpec, inputs_hash: str) -> str:
    return f"{spec.image_repository}:{inputs_hash[:16]}"


@dataclass(frozen=True)
class BuildTarget:
    """What `build` makes from the method's current inputs: the base, the inputs, their hash, the tag."""

    spec: MethodSpec
    base: BaseImage
    inputs: dict[str, str]
    digest: str                # the inputs hash

    @property
    def tag(self) -> str:
        return image_tag(self.spec, self.digest)

    @property
    def lock_hash(self) -> str:
        return self.inputs["lock"]

    def layers(self, ctx: Context) -> list[Layer]:
        """Base + environment layers + [system packages +] method layer, from the cache (or made again)."""
        return self.config(ctx).layers

    def config(self, ctx: Context, need_bytes: frozenset[str] = frozenset(),
               defer: contextlib.ExitStack | None = None) -> ImageConfig:
        """The image config of these inputs, its layers taken from the cache (or made again when missing).

        An environment layer whose bytes were handed to the engine has no file; one whose diff ID is in
        `need_bytes` is made again (see _assemble). `defer`: see layers.build_env_layers.

        The system layer sits above the environment layers: the engine shares a layer between images
        only when every layer below it is the same, so methods with and without system packages still
        share their torch layers.
        """
        env = env_layers(ctx, self.spec, self.base, self.inputs, need_bytes, defer)
        system = system_layer(ctx, self.spec, self.base)
        layers = [self.base.layer, *env.layers, *([system] if system else []),
                  method_layer(ctx, self.spec, self.inputs, self.digest)]
        facts = recorded_facts(ctx, env, [self.base.layer, *([system] if system else [])])
        config = image_config(self.spec, self.base, layers, self.inputs, self.digest,
                              {**gpu_image_labels(self.spec, env.gpu_archs or []), LAYER_FACTS: facts.to_label()},
                              env_labels=env.labels)
        if system:
            config.history.insert(len(config.history) - 1, system_history(self.spec))
        return config


def recorded_facts(ctx: Context, env: EnvLayers, system: list[Layer]) -> ImageFacts:
    """What the image's layer-facts label records (envmgr.build.layer_facts): each environment layer's group and
    distributions, and what an SBOM lists of it and of the base (and system) layer."""
    from envmgr.build.contents import cached_layer_facts, dpkg_facts

    groups = env.groups or [(None, [])] * len(env.layers)
    sbom = cached_layer_facts(ctx, env.layers)
    return ImageFacts(layers=[LayerFacts(diff_id=layer.diff_id, size=layer.size, group=group, units=units,
                                         sbom=facts)
                              for layer, (group, units), facts in zip(env.layers, groups, sbom, strict=True)],
                      dpkg=dpkg_facts(ctx, system))


def target(ctx: Context, spec: MethodSpec, base: BaseImage | None = None) -> BuildTarget:
    """What `build` would make now, without building."""
    base = base or ensure_base(ctx, spec.base_image)
    data = inputs(ctx, spec, base)
    return BuildTarget(spec, base, data, inputs_digest(data))


def require_image(ctx: Context, method: str) -> tuple[BuildTarget, str]:
    """The method's current target and the ID of its image in the engine: the preamble of export and push.

    Raises when the method is unknown, its lock is stale, or no image was built from the current inputs.
    """
    from envmgr.core.spec import find_method

    spec = find_method(method, ctx.config.base_dir)
    get_backend(spec).check(spec)
    wanted = target(ctx, spec)
    image_id = ctx.engine.image_id(wanted.tag)
    if image_id is None:
        raise UsageError(f"{spec.name}: no image for the current inputs ({wanted.tag})",
                         hint=f"build it first: `envmgr build {spec.name}`")
    return wanted, image_id


def env_record(ctx: Context, spec: MethodSpec, data: dict[str, str]) -> Path:
    env_key = inputs_digest({"layout": data["layout"], "base": data["base"], "lock": data["lock"],
                       "installer": data["installer"], "prefix": spec.env_prefix})[:32]
    layers = ctx.cache_dir / "layers"
    layers.mkdir(parents=True, exist_ok=True)
    return layers / f"env-{spec.name}-{env_key}.json"


def is_layered(spec: MethodSpec) -> bool:
    """Whether the method's environment is made of per-distribution layers (its backend lists units)."""
    return get_backend(spec).layered


def env_layers(ctx: Context, spec: MethodSpec, base: BaseImage, data: dict[str, str],
               need_bytes: frozenset[str] = frozenset(), defer: contextlib.ExitStack | None = None) -> EnvLayers:
    """The environment's layers, bottom first: per distribution from the layer store (poetry, pip) or
    one layer (conda: rattler links the whole prefix with the method's own path in its files)."""
    units = get_backend(spec).layer_entries(ctx, spec, base)
    if units is None:
        layer = env_layer(ctx, spec, base, data, need_bytes)
        record = env_record(ctx, spec, data)
        archs = json.loads(record.read_text()).get("gpu_archs", []) if record.is_file() else []
        return EnvLayers([layer], ["environment"], archs)
    entries, extra_indexes = units
    return build_env_layers(ctx, spec.name, base, entries, extra_indexes, data["layout"], data["installer"],
                            uv_version(ctx), bool(lock_facts(spec).torch), need_bytes, defer)


def env_layer(ctx: Context, spec: MethodSpec, base: BaseImage, data: dict[str, str],
              need_bytes: frozenset[str] = frozenset()) -> Layer:
    """The installed environment as one layer, cached by what determines it (lock, base, installer)."""
    record = env_record(ctx, spec, data)
    tar = record.with_suffix(".tar")
    if record.is_file():
        # a layer made before GPU facts were recorded is made again when it has torch (once)
        cached = _cached_layer(ctx, record, tar, needs_archs=bool(lock_facts(spec).torch), need_bytes=need_bytes)
        if cached is not None:
            return cached
    prefix_root = ctx.cache_dir / "envs"
    prefix_root.mkdir(parents=True, exist_ok=True)
    prefix = Path(tempfile.mkdtemp(dir=prefix_root, prefix=f"{spec.name}-"))
    try:
        get_backend(spec).install(ctx, spec, base, prefix)
        gpu_archs = read_archs(ctx, spec, base, prefix)
        total = sum(p.lstat().st_size for p in prefix.rglob("*") if p.is_file() and not p.is_symlink())
        with ctx.ui.progress("writing the environment layer", total=total, unit="bytes") as task:
            layer = write_layer(tar, trees=[(prefix, spec.env_prefix)], progress=task.advance)
    finally:
        shutil.rmtree(prefix, ignore_errors=True)
        tar.with_name(tar.name + ".partial").unlink(missing_ok=True)
    _write_record(record, layer.diff_id, layer.size, tar, gpu_archs)
    return layer


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def _cached_layer(ctx: Context, record: Path, tar: Path, needs_archs: bool = False,
                  need_bytes: frozenset[str] = frozenset()) -> Layer | None:
    """The cached layer if its bytes still hash to its recorded diff ID; else None (it is made again).

    A layer untouched since it was written (same size, mtime and inode as recorded) is reused without
    reading it, so a method-file rebuild of a multi-GB environment stays fast; any other is hashed.
    A layer whose bytes were handed to the engine (released) is used without a file unless `need_bytes`
    names it.
    """
    from envmgr.images.image import file_sha256

    try:
        known = json.loads(record.read_text())
        diff_id, size = str(known["diff_id"]), int(known["size"])
    except (OSError, ValueError, KeyError, TypeError):
        ctx.ui.warn(f"cached layer record {record.name} is unreadable: making the layer again")
        return None
    if needs_archs and "gpu_archs" not in known:
        return None
    if not tar.is_file():
        if known.get("released") and diff_id not in need_bytes:
            ctx.ui.step(f"environment layer for this lock is in the engine ({size / 1e6:.0f} MB)")
            return Layer(path=tar, diff_id=diff_id, size=size)
        return None
    if known.get("stamp") != _stamp(tar):
        if tar.stat().st_size != size or "sha256:" + file_sha256(tar)[0] != diff_id:
            ctx.ui.warn(f"cached layer {tar.name} is damaged (its bytes do not hash to {diff_id[:19]}): "
                        "making it again")
            return None
        _write_record(record, diff_id, size, tar, known.get("gpu_archs"))
    ctx.ui.step(f"environment layer for this lock is cached ({size / 1e6:.0f} MB)")
    return Layer(path=tar, diff_id=diff_id, size=size)


def _write_record(record: Path, diff_id: str, size: int, tar: Path, gpu_archs: list[str] | None = None) -> None:
    data: dict[str, object] = {"diff_id": diff_id, "size": size, "stamp": _stamp(tar)}
    if gpu_archs is not None:
        data["gpu_archs"] = gpu_archs
    atomic_write(record, json.dumps(data))   # a build killed here leaves no half-written record


def method_info(spec: MethodSpec, data: dict[str, str]) -> dict:
    return {"name": spec.name, "backend": spec.backend, "env_prefix": spec.env_prefix, "entry": spec.entry,
            "method_dir": paths.CONTAINER_METHOD_DIR, "gpu": spec.gpu, "default_model": spec.default_model,
            "envmgr": __version__, "inputs": data}


def method_layer(ctx: Context, spec: MethodSpec, data: dict[str, str], digest: str) -> Layer:
    """The method's files, the conda shim and method.json; for a layered environment also the link from
    the method's own prefix to the shared one its layers fill."""
    layered = is_layered(spec)
    excluded = method_excludes(spec)
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
        if layered:
            extras.append(ExtraFile(spec.env_prefix.lstrip("/"), b"", 0o777,
                                    link=os.path.relpath(PHYSICAL_PREFIX, os.path.dirname(spec.env_prefix))))
        return write_layer(ctx.cache_dir / "layers" / f"method-{spec.name}-{digest[:32]}.tar",
                           trees=[(files, paths.CONTAINER_METHOD_DIR)], extra_files=extras)


def image_config(spec: MethodSpec, base: BaseImage, layers: list[Layer], data: dict[str, str],
                 digest: str, gpu_labels: dict[str, str] | None = None,
                 env_labels: list[str] | None = None) -> ImageConfig:
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
        paths.LABEL_BASE: base.image_id, **(gpu_labels or {}),
    }
    return ImageConfig(
        layers=layers, env=env, cmd=entry_command(spec, spec.entry), workdir=paths.CONTAINER_METHOD_DIR, labels=labels,
        history=[f"envmgr base {spec.base_image}",
                 *[f"envmgr environment {label}" for label in env_labels or []],
                 f"envmgr method files {spec.name}"] if env_labels and env_labels != ["environment"] else
                [f"envmgr base {spec.base_image}", f"envmgr environment {spec.name} ({spec.backend} lock "
                 f"{data['lock'][:16]})", f"envmgr method files {spec.name}"],
    )


def build_running(cache: Path, besides: str = "") -> bool:
    """Whether a build holds its lock (`besides`: the caller's own lock file name, not counted)."""
    for guard_path in (cache / "locks").glob("build-*.lock") if (cache / "locks").is_dir() else []:
        if guard_path.name == besides:
            continue
        with open_lock(guard_path) as guard:
            try:
                fcntl.flock(guard, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(guard, fcntl.LOCK_UN)
            except BlockingIOError:
                return True
    return False
