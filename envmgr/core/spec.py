"""Method specs: `envs/<name>/envmgr.toml` (built-in) or `<base_dir>/methods/<name>/envmgr.toml` (added)."""

from __future__ import annotations

import datetime
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from envmgr.core import names, paths
from envmgr.core.errors import UsageError
from envmgr.core.tomlfile import load_model

# A method name is an image repository path component (`envmgr/<name>`): lower-case alphanumerics
# joined by one '.', one or two '_', or dashes; envmgr's own repositories (`envmgr/base-*`) are reserved.
NAME_RE = names.METHOD
RESERVED_PREFIXES = ("base-",)
NAME_RULE = ("lower-case letters and digits, joined by single '.', '_' or '-' (no leading, trailing or "
             "doubled dots), at most 63 characters, not starting with 'base-' (envmgr's base images)")


class _ShapesImage:
    """Marks a spec field whose value decides what an image holds: it is hashed into the image's inputs
    (`MethodSpec.spec_hash`). A field without the mark (how a run mounts its dataset, is judged, may grow)
    is not, so adding one rebuilds no image."""

    def __repr__(self) -> str:
        return "Image"


_SHAPES_IMAGE = _ShapesImage()
_T = TypeVar("_T")
Image = Annotated[_T, _SHAPES_IMAGE]    # `name: Image[str]`: the field is part of spec_hash


def image_fields(model: type[BaseModel]) -> dict[str, Any]:
    """The marked fields of `model` as a pydantic `include` tree (a marked field holding a model: its own
    marked fields)."""
    tree: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        if _SHAPES_IMAGE not in info.metadata:
            continue
        nested = info.annotation
        tree[name] = image_fields(nested) if isinstance(nested, type) and issubclass(nested, BaseModel) else True
    return tree


def name_problem(name: str) -> str | None:
    if not names.is_valid(NAME_RE, name):
        return NAME_RULE
    if name.startswith(RESERVED_PREFIXES):
        return f"{name!r} clashes with envmgr's own images (envmgr/base-*)"
    return None


class Adaptations(BaseModel):
    """How a third-party method is adapted without forking it: applied at lock time, recorded in
    the lock's inputs, the method's own files left byte-identical."""

    model_config = ConfigDict(extra="forbid")

    # every adaptation changes the lock, so each is part of the image's spec hash
    pin: Image[dict[str, str]] = Field(default_factory=dict)      # name -> version: replaces a range, git or URL
    drop: Image[list[str]] = Field(default_factory=list)          # dependencies removed
    add: Image[dict[str, str]] = Field(default_factory=dict)      # name -> constraint ("*" for any)
    sources: Image[dict[str, str]] = Field(default_factory=dict)  # a declared index -> "default" or "mirror"
    # pip methods: the repository's file of exact pins its lock starts from (envmgr/lock/repository_pins.py);
    # None: the common names are detected, false: none (a fresh solve)
    repository_pins: Image[str | Literal[False] | None] = None
    # packages allowed to be built from their source distribution, by name; envmgr installs wheels only,
    # and builds these in a box of their own (no network, no credentials: envmgr/lock/backends/source_builds.py)
    build_from_source: Image[list[str]] = Field(default_factory=list)
    # pip methods: lock the versions the index had published before this day (YYYY-MM-DD; uv --exclude-newer),
    # false: the newest; unset: before the day after the method's `source_date` when the repository pins nothing
    resolve_as_of: Image[str | Literal[False] | None] = None

    @field_validator("resolve_as_of")
    @classmethod
    def _resolve_as_of(cls, value: str | Literal[False] | None) -> str | Literal[False] | None:
        return _date(value) if isinstance(value, str) else value

    @field_validator("repository_pins")
    @classmethod
    def _repository_pins(cls, value: str | Literal[False] | None) -> str | Literal[False] | None:
        if isinstance(value, str) and (not value.strip() or Path(value).is_absolute() or ".." in Path(value).parts):
            raise ValueError(f"{value!r}: a file of the repository, relative to its folder (e.g. "
                             "\"requirements-lock.txt\"), or false for none")
        return value

    def is_empty(self) -> bool:
        return not (self.pin or self.drop or self.add or self.sources)

    def describe(self) -> list[str]:
        lines = [f"pin {name} == {version}" for name, version in sorted(self.pin.items())]
        lines += [f"drop {name}" for name in sorted(self.drop)]
        lines += [f"add {name} {constraint}" for name, constraint in sorted(self.add.items())]
        lines += [f"index {name!r} -> {'the default index' if target == 'default' else 'its site mirror'}"
                  for name, target in sorted(self.sources.items())]
        lines += [f"build {name} from its source distribution (no network, no credentials)"
                  for name in sorted(self.build_from_source)]
        if self.resolve_as_of:
            lines.append(f"versions published before {self.resolve_as_of}")
        elif self.resolve_as_of is False:
            lines.append("the newest versions (not as of the repository's date)")
        if self.repository_pins is False:
            lines.append("the repository's pins ignored (a fresh solve)")
        elif self.repository_pins:
            lines.append(f"start from the repository's pins in {self.repository_pins}")
        return lines


DEB_PACKAGE_RE = names.DEB_PACKAGE


class SystemPackages(BaseModel):
    """`[system] apt = ["libgl1"]`: Debian packages from the site's apt mirror, in their own image layer
    (envmgr/build/system_layer.py)."""

    model_config = ConfigDict(extra="forbid")

    apt: Image[list[str]] = Field(default_factory=list)

    @field_validator("apt")
    @classmethod
    def _apt(cls, value: list[str]) -> list[str]:
        for name in value:
            if not names.is_valid(DEB_PACKAGE_RE, name):
                raise ValueError(f"{name!r}: a Debian package name (e.g. \"libgl1\", or \"libgl1=1.6.0-1\")")
        return value


class Variant(BaseModel):
    """A build of the method that changes pins only, e.g. an older torch for an older CUDA driver:
    `[variants.cu128] pin = { torch = "2.10.0" }`. Applied through the `[adapt]` machinery, locked
    beside the default lock (`variants/<name>/`), built under its own image tag."""

    model_config = ConfigDict(extra="forbid")

    pin: dict[str, str]
    description: str = ""


class RunLimits(BaseModel):
    """`[limits]`: what a run of the method needs (sizes such as "32g"); the flags and the site's `[run]` win,
    and none goes past what the host allows (envmgr/runs/run.py `Limits`)."""

    model_config = ConfigDict(extra="forbid")

    memory: str | None = None
    shm_size: str | None = None
    tmp_size: str | None = None


def _date(value: str) -> str:
    try:
        return datetime.date.fromisoformat(value).isoformat()
    except ValueError:
        raise ValueError(f"{value!r}: a day, YYYY-MM-DD") from None


class MethodSpec(BaseModel):
    # Fields marked `Image[...]` decide what the method's image holds and are hashed into its inputs
    # (spec_hash); unmarked ones (how a run is judged, mounted or sized) change no image.
    model_config = ConfigDict(extra="forbid")

    name: Image[str]
    description: Image[str] = ""
    backend: Image[str] = "poetry"
    python: Image[str] = "3.11"
    base_image: Image[str] = "bookworm-py311"
    source_dir: Image[str] = "."                # relative to the spec's folder: files copied into the image
    lock_dir: Image[str] = "."                  # relative to the spec's folder: where envmgr writes the lock
    entry: Image[list[str]]                     # run in CONTAINER_METHOD_DIR, e.g. ["python", "sd-demo.py"]
    default_model: Image[str | None] = None
    gpu: Image[Literal["required", "optional", "none"]] = "optional"
    platform: Image[Literal["linux-64", "linux-aarch64"]] = "linux-64"   # what images are built for
    # conda methods: the platforms the lock is solved for (default: `platform`) and the virtual
    # packages the solver may assume there, e.g. {"__cuda" = "12.4"}; __glibc defaults to the base's
    platforms: Image[list[Literal["linux-64", "linux-aarch64"]]] = Field(default_factory=list)
    virtual_packages: Image[dict[str, str]] = Field(default_factory=dict)
    env: Image[dict[str, str]] = Field(default_factory=dict)
    exclude: Image[list[str]] = Field(default_factory=list)   # glob patterns of files not copied into the image
    platform_args: Image[bool] = True   # pass the platform's --model_path/--pic_relative_path/... to the entry
    # the entry's working directory: the run dir, or a writable copy of its own files (<run_dir>/work/method)
    workdir: Image[Literal["run", "method"]] = "run"
    # globs relative to the run dir that must each match a file the run wrote, else exit 0 is `failed (no outputs)`
    success: Image[list[str] | None] = None
    # without `success`: "training" (what `method add` writes) fails an exit 0 whose log ends in a traceback or
    # that wrote no weights/checkpoint under output/; "exit-code" (the default) lets the exit status decide
    verdict: Literal["training", "exit-code"] | None = None
    # how a run sees its dataset (envmgr/runs/datasets.py): as given, extracted read-only, or a writable copy;
    # default: added methods get an archive extracted, anything else as given
    dataset_mode: Literal["archive", "extracted", "writable"] | None = None
    adapt: Image[Adaptations] = Field(default_factory=Adaptations)
    # the repository's own date (YYYY-MM-DD, `method add` reads it from its files and its git history): a
    # repository that pins nothing is locked as of then (adapt.resolve_as_of). Unmarked: the lock holds it.
    source_date: str | None = None
    system: Image[SystemPackages] = Field(default_factory=SystemPackages)
    gpu_memory_gb: float | None = Field(default=None, gt=0)   # the least memory (GB, 10^9 bytes) a GPU needs
    limits: RunLimits = Field(default_factory=RunLimits)     # memory, /dev/shm and /tmp a run needs
    variants: dict[str, Variant] = Field(default_factory=dict)

    # Which variant this spec was derived for (envmgr/core/variants.py), not part of the file.
    variant: str | None = Field(default=None, exclude=True)

    # Where the spec was read from (not part of the file).
    folder: Path = Field(default=Path("."), exclude=True)
    builtin: bool = Field(default=True, exclude=True)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        problem = name_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("source_date")
    @classmethod
    def _source_date(cls, value: str | None) -> str | None:
        return _date(value) if value is not None else value

    @field_validator("source_dir", "lock_dir")
    @classmethod
    def _inside_method_folder(cls, value: str) -> str:
        parts = Path(value).parts
        if Path(value).is_absolute() or ".." in parts:
            raise ValueError("a path inside the method's folder (relative, without '..')")
        return value

    @field_validator("success")
    @classmethod
    def _success(cls, value: list[str] | None) -> list[str] | None:
        for pattern in value or []:
            if not pattern or Path(pattern).is_absolute() or ".." in Path(pattern).parts:
                raise ValueError(f"{pattern!r}: a glob relative to the run directory, e.g. \"output/*.safetensors\"")
        return value

    @field_validator("entry")
    @classmethod
    def _entry(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("must name a command, e.g. [\"python\", \"train.py\"]")
        return value

    @field_validator("virtual_packages")
    @classmethod
    def _virtual_packages(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not name.startswith("__"):
                raise ValueError(f"{name!r}: virtual package names start with '__' (e.g. __cuda, __glibc)")
        return value

    @field_validator("variants")
    @classmethod
    def _variants(cls, value: dict[str, Variant]) -> dict[str, Variant]:
        for name, variant in value.items():
            if not names.is_valid(NAME_RE, name):
                raise ValueError(f"{name!r}: lower-case letters, digits, '.', '_' and '-'")
            if not variant.pin:
                raise ValueError(f"{name!r}: a variant changes pins: pin = {{ torch = \"<version>\" }}")
        return value

    @model_validator(mode="after")
    def _variant_locks_stay_out_of_images(self) -> "MethodSpec":
        # variant locks live under the method's folder; no image needs another variant's lock
        if self.variants and paths.VARIANTS_DIR not in self.exclude:
            self.exclude = [*self.exclude, paths.VARIANTS_DIR, f"{paths.VARIANTS_DIR}/*"]
        return self

    @property
    def lock_platforms(self) -> list[str]:
        """The platforms a lock covers: the declared ones, always including the one images are built for."""
        return sorted({*self.platforms, self.platform})

    @property
    def source_path(self) -> Path:
        return self._inside(self.source_dir, "source_dir")

    @property
    def lock_path(self) -> Path:
        return self._inside(self.lock_dir, "lock_dir")

    def _inside(self, relative: str, key: str) -> Path:
        """A folder of the method, after links: it must stay inside the method's folder."""
        folder = self.folder.resolve()
        path = (folder / relative).resolve()
        if path != folder and folder not in path.parents:
            raise UsageError(f"{folder / paths.SPEC_FILE}: key '{key}': {relative!r} leads outside the method's "
                             f"folder (to {path})")
        return path

    @property
    def env_prefix(self) -> str:
        return f"{paths.CONTAINER_ENVS_ROOT}/{self.name}"

    @property
    def image_repository(self) -> str:
        return f"{paths.IMAGE_REPO_PREFIX}{self.name}" + (f"-{self.variant}" if self.variant else "")

    def spec_hash(self) -> str:
        """The hash of the fields marked `Image` (what the image holds); a variant's pins reach its own spec
        through `adapt`, and a field that only shapes a run is left unmarked."""
        data = self.model_dump(mode="json", include=image_fields(type(self)))
        if not self.system.apt:
            data.pop("system", None)       # specs without system packages keep the hash they had
        if self.adapt.resolve_as_of is None:
            data["adapt"].pop("resolve_as_of", None)   # and specs that leave the day to envmgr
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _spec_files(base_dir: Path | None) -> list[tuple[Path, bool]]:
    found = []
    if paths.BUILTIN_METHODS_DIR.is_dir():
        found += [(p, True) for p in sorted(paths.BUILTIN_METHODS_DIR.glob(f"*/{paths.SPEC_FILE}"))]
    if base_dir and (base_dir / "methods").is_dir():
        found += [(p, False) for p in sorted((base_dir / "methods").glob(f"*/{paths.SPEC_FILE}"))]
    return found


def load_spec(path: Path, builtin: bool = True) -> MethodSpec:
    spec = load_model(MethodSpec, path)
    spec.folder = path.parent.resolve()
    spec.builtin = builtin
    if spec.name != path.parent.name:
        raise UsageError(f"{path}: key 'name': {spec.name!r} must match its folder name {path.parent.name!r}")
    return spec


def list_methods(base_dir: Path | None) -> list[MethodSpec]:
    return [load_spec(path, builtin) for path, builtin in _spec_files(base_dir)]


def find_method(name: str, base_dir: Path | None) -> MethodSpec:
    for path, builtin in _spec_files(base_dir):
        if path.parent.name == name:
            return load_spec(path, builtin)
    known = ", ".join(path.parent.name for path, _ in _spec_files(base_dir)) or "none"
    raise UsageError(f"unknown method {name!r} (known: {known})", hint="`envmgr list` shows every method")
