"""Variants of a method: the same method with other pins (e.g. an older torch for an older CUDA
driver), each locked under `<lock_dir>/variants/<name>/` and built under its own image tag.

A variant is applied as extra `[adapt]` pins on a copy of the spec, so every backend locks,
checks and installs it the way it does the default.
"""

from __future__ import annotations

from envmgr.core.errors import StaleLockError, UsageError
from envmgr.core.paths import VARIANTS_DIR
from envmgr.core.spec import MethodSpec

DEFAULT = "default"


def variant_spec(spec: MethodSpec, name: str | None) -> MethodSpec:
    """The spec to lock, build and run for variant `name` (None or "default": the spec itself)."""
    if name in (None, DEFAULT):
        return spec
    if spec.variant:
        raise UsageError(f"{spec.name}: already the {spec.variant!r} variant")
    if name not in spec.variants:
        known = ", ".join([DEFAULT, *sorted(spec.variants)])
        raise UsageError(f"{spec.name} has no variant {name!r} (it has: {known})",
                         hint=f"`envmgr show {spec.name}` lists them")
    variant = spec.variants[name]
    adapt = spec.adapt.model_copy(update={"pin": {**spec.adapt.pin, **variant.pin}})
    lock_dir = f"{spec.lock_dir.rstrip('/')}/{VARIANTS_DIR}/{name}" if spec.lock_dir not in ("", ".") \
        else f"{VARIANTS_DIR}/{name}"
    derived = spec.model_copy(update={"adapt": adapt, "lock_dir": lock_dir, "variant": name}, deep=True)
    derived.folder, derived.builtin = spec.folder, spec.builtin
    return derived


def all_variants(spec: MethodSpec) -> list[MethodSpec]:
    """The default spec first, then each declared variant in the order the spec gives them."""
    return [spec, *(variant_spec(spec, name) for name in spec.variants)]


def label(spec: MethodSpec) -> str:
    return spec.variant or DEFAULT


def lock_command(spec: MethodSpec) -> str:
    return f"envmgr lock {spec.name}" + (f" --variant {spec.variant}" if spec.variant else "")


def restate_stale(spec: MethodSpec, exc: StaleLockError) -> StaleLockError:
    """A stale-lock error of a variant, with the command that re-locks that variant."""
    if not spec.variant:
        return exc
    return StaleLockError(f"{exc.message} (variant {spec.variant})", hint=f"run `{lock_command(spec)}`")
