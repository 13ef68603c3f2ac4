"""Where vs what: a mirror password and a registry password never land in anything envmgr writes.

The fixture method is locked, built, run, exported and verified through a mirror whose URL carries a
unique token as its password, with a registry password that carries the same token. Then every byte
envmgr left behind is scanned: the image as the engine saves it (every layer, the config with its
labels and history), the engine's inspect and history answers, the base dir (lock, spec, run records,
logs, outputs), the cache (layers, SBOM, signature records), the export, and every line printed.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from tests.integration.conftest import TINY_MAIN, TINY_PYPROJECT, TINY_SPEC
from tests.support.pypi import Index

pytestmark = pytest.mark.engine

NAME = "tiny-secrets"


class Scanner:
    def __init__(self, token: str):
        self.needle = token.encode()
        self.hits: list[str] = []
        self.places = 0
        self.bytes = 0

    def scan(self, where: str, chunks) -> None:
        """Scan a stream of byte chunks (a token split across two chunks is still found)."""
        self.places += 1
        tail = b""
        for chunk in chunks:
            if isinstance(chunk, str):
                chunk = chunk.encode()
            self.bytes += len(chunk)
            window = tail + chunk
            if self.needle in window:
                at = window.index(self.needle)
                context = window[max(0, at - 80): at + len(self.needle) + 40].replace(self.needle, b"<TOKEN>")
                self.hits.append(f"{where}: ...{context!r}...")
                return
            tail = (tail + chunk)[-len(self.needle):]

    def tree(self, root: Path) -> None:
        for path in sorted(root.rglob("*")):
            if path.is_file() and not path.is_symlink():
                with open(path, "rb") as fh:
                    self.scan(str(path), iter(lambda fh=fh: fh.read(1 << 20), b""))
            elif path.is_symlink():
                self.scan(f"{path} (link)", [str(path.readlink())])


def test_mirror_and_registry_passwords_land_nowhere(workspace, wheels, engine, tmp_path):
    token = "tok" + uuid.uuid4().hex
    index = Index(wheels, username="builder", password=token).start()
    try:
        mirror = index.url
        assert f":{token}@" in mirror
        folder = workspace.base_dir / "methods" / NAME
        folder.mkdir(parents=True)
        (folder / "envmgr.toml").write_text(TINY_SPEC.replace('name = "tiny"', f'name = "{NAME}"'))
        (folder / "pyproject.toml").write_text(TINY_PYPROJECT)
        (folder / "main.py").write_text(TINY_MAIN)
        secret_env = {"ENVMGR_REGISTRY_USER": "admin", "ENVMGR_REGISTRY_PASSWORD": token}
        printed = []
        for args in (["lock", NAME], ["--json", "build", NAME], ["-v", "build", "--force", NAME],
                     ["--json", "run", NAME, "--gpus", "none"], ["-v", "run", NAME, "--gpus", "none"],
                     ["export", NAME, "-o", str(tmp_path / "export.tar")], ["sbom", NAME],
                     ["--json", "verify", NAME], ["doctor"]):
            proc = workspace.envmgr(*args, mirror=mirror, check=args[0] != "doctor", **secret_env)
            printed.append((" ".join(args), proc.stdout + proc.stderr))
        assert index.requests, "the mirror was never asked: the token was not exercised"
    finally:
        index.stop()

    scanner = Scanner(token)
    tag = f"envmgr/{NAME}:latest"
    scanner.scan(f"image {tag} as the engine saves it (layers, config, labels, history)",
                 engine.api.get_image(tag))
    scanner.scan("image inspect", [json.dumps(engine.api.inspect_image(tag))])
    scanner.scan("image history", [json.dumps(engine.api.history(tag))])
    for container in engine.containers.list(all=True, filters={"label": f"org.envmgr.method={NAME}"}):
        scanner.scan(f"container {container.id[:12]}", [json.dumps(container.attrs)])
    scanner.tree(workspace.base_dir)      # spec, lock, run records, logs, outputs
    scanner.tree(workspace.cache_dir)     # layers, SBOM, records
    with open(tmp_path / "export.tar", "rb") as exported:
        scanner.scan("export", iter(lambda: exported.read(1 << 20), b""))
    for command, text in printed:
        scanner.scan(f"output of envmgr {command}", [text])
    runs = list((workspace.base_dir / "runs").rglob("run.json"))
    assert len(runs) == 2 and list((workspace.base_dir / "runs").rglob("log.txt"))
    assert (workspace.base_dir / "methods" / NAME / "poetry.lock").is_file()
    assert list((workspace.cache_dir / "sbom").glob("*.cdx.json"))
    print(f"\nsecrets scan: {scanner.places} places, {scanner.bytes / 1e6:.1f} MB, {len(scanner.hits)} hits")
    assert scanner.hits == [], "\n".join(scanner.hits)
