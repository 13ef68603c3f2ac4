"""`envmgr lock`: the method's backend solves in a container of its base image, through the site's mirrors."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from envmgr.core.errors import StaleLockError
from envmgr.core.spec import find_method
from envmgr.core.variants import restate_stale, variant_spec
from envmgr.door.context import Context
from envmgr.images.base import ensure_base
from envmgr.lock.backends import get_backend


@dataclass
class LockResult:
    method: str
    current: bool                                   # the lock was checked, not written
    files: list[Path] = field(default_factory=list)  # the lock files written
    # what moved against the method's own lock: {"package", "theirs", "ours"} (None: it has no lock of its own)
    drift: list[dict[str, str | None]] | None = None
    seeded_from: str | None = None                  # the repository's pins file the lock started from (pip)


def lock(ctx: Context, method: str, *, check: bool = False, regenerate: bool = False,
         variant: str | None = None) -> LockResult:
    """Check the method's (or a variant's) lock (StaleLockError when it is missing or stale), or write it and
    check it."""
    spec = variant_spec(find_method(method, ctx.config.base_dir), variant)
    backend = get_backend(spec)
    if check:
        try:
            backend.check(spec)
        except StaleLockError as exc:
            raise restate_stale(spec, exc) from None
        return LockResult(spec.name, current=True)
    base = ensure_base(ctx, spec.base_image)
    written = backend.lock(ctx, spec, base, regenerate=regenerate)
    backend.check(spec)
    return LockResult(spec.name, current=False, files=written, drift=backend.drift(spec),
                      seeded_from=backend.seeded_from(spec))
