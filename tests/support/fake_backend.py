"""A test-only backend: what adding a kind of environment takes — this one module and one entry in
`envmgr.lock.backends.registry()`. It answers every question of `envmgr.lock.backends.Backend` (a
"pixi" method: pixi.toml, locked into pixi.lock) without an engine or a network, and records which
questions envmgr asked it."""

from __future__ import annotations

import hashlib
from pathlib import Path

from envmgr.core.errors import StaleLockError, UsageError
from envmgr.core.spec import MethodSpec
from envmgr.door.context import Context
from envmgr.images.base import BaseImage
from envmgr.lock.backends.protocol import Evidence

MANIFEST = "pixi.toml"
LOCK = "pixi.lock"
PIN = "numpy==1.26.4"
PIN_SHA = "a" * 64


class PixiBackend:
    name = "pixi"
    env_file = MANIFEST

    def __init__(self, layered: bool = True):
        self.layered = layered
        self.asked: list[str] = []

    def _asked(self, question: str) -> None:
        self.asked.append(question)

    def detect(self, root: Path, pyproject: dict) -> Evidence | None:
        self._asked("detect")
        return Evidence(MANIFEST) if (root / MANIFEST).is_file() else None

    def refuse_over(self, root: Path, pyproject: dict, others: list[str]) -> None:
        self._asked("refuse_over")
        if "pip" in others and "strict" in (root / MANIFEST).read_text():
            raise UsageError(f"{root}: {MANIFEST} and requirements.txt disagree; pixi would win",
                             hint="choose one with --backend pixi or --backend pip")

    def lock_files(self, spec: MethodSpec) -> list[Path]:
        self._asked("lock_files")
        return [spec.lock_path / LOCK]

    def _inputs(self, spec: MethodSpec) -> str:
        return hashlib.sha256((spec.source_path / MANIFEST).read_bytes()).hexdigest()

    def lock(self, ctx: Context, spec: MethodSpec, base: BaseImage, regenerate: bool = False) -> list[Path]:
        self._asked("lock")
        spec.lock_path.mkdir(parents=True, exist_ok=True)
        (spec.lock_path / LOCK).write_text(f"# inputs {self._inputs(spec)}\n{PIN} --hash=sha256:{PIN_SHA}\n")
        return [spec.lock_path / LOCK]

    def check(self, spec: MethodSpec) -> None:
        self._asked("check")
        lock = spec.lock_path / LOCK
        if not lock.is_file():
            raise StaleLockError(f"{spec.name}: no {LOCK} yet", hint=f"run `envmgr lock {spec.name}`")
        if lock.read_text().splitlines()[0] != f"# inputs {self._inputs(spec)}":
            raise StaleLockError(f"{spec.name}: {LOCK} does not match {MANIFEST}")

    def drift(self, spec: MethodSpec) -> list[dict[str, str | None]] | None:
        self._asked("drift")
        return [{"package": "numpy", "theirs": "1.26.0", "ours": "1.26.4"}]

    def seeded_from(self, spec: MethodSpec) -> str | None:
        self._asked("seeded_from")
        return "pixi.lock.theirs"

    def summary(self, spec: MethodSpec) -> dict:
        self._asked("summary")
        return {"lock": str(spec.lock_path / LOCK), "packages": 1, "pins": {"numpy": "1.26.4"}}

    def install(self, ctx: Context, spec: MethodSpec, base: BaseImage, prefix: Path) -> None:
        self._asked("install")
        (prefix / "bin").mkdir(parents=True)
        (prefix / "bin" / "pixi-env").write_text("#!/bin/sh\n")

    def layer_entries(self, ctx: Context, spec: MethodSpec, base: BaseImage) -> tuple[list[str], list[str]] | None:
        self._asked("layer_entries")
        return ([f"{PIN} --hash=sha256:{PIN_SHA}"], []) if self.layered else None

    def entry_prefix(self, spec: MethodSpec) -> list[str]:
        self._asked("entry_prefix")
        return ["pixi", "run", "--"]

    def lock_file_hashes(self, spec: MethodSpec) -> dict[str, list[str]]:
        self._asked("lock_file_hashes")
        return {"numpy": [PIN_SHA]}
