"""stdout is data, stderr is talk, against a real engine (issue 24): every verb run here gives stdout that parses
(JSON events with --json, one CycloneDX document from `sbom`) or is empty, with a cold cache and a warm one.

The cold `sbom` is the case that failed `make test` from a fresh clone: a cache dir that never saw the build
holds neither the SBOM nor the layers, so envmgr reads them back from the engine, and said so on stdout."""

from __future__ import annotations

import json

import pytest

from tests.integration.conftest import TINY_MAIN, TINY_PYPROJECT, TINY_SPEC

pytestmark = pytest.mark.engine

NAME = "tiny-streams"   # its own image name: another test's cleanup of envmgr/tiny never removes it mid-test


def _json_lines(proc) -> list[dict]:
    assert proc.stdout.strip(), proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


def test_stdout_parses_with_a_cold_and_a_warm_cache(workspace, mirror_a, tmp_path):
    folder = workspace.base_dir / "methods" / NAME
    folder.mkdir(parents=True)
    (folder / "envmgr.toml").write_text(TINY_SPEC.replace('name = "tiny"', f'name = "{NAME}"'))
    (folder / "pyproject.toml").write_text(TINY_PYPROJECT)
    (folder / "main.py").write_text(TINY_MAIN)
    # cold: a fresh cache dir (the workspace's), then the same one warm
    for _ in ("cold", "warm"):
        _json_lines(workspace.envmgr("--json", "lock", NAME, mirror=mirror_a.url))
        built = _json_lines(workspace.envmgr("--json", "build", NAME, mirror=mirror_a.url))
        assert built[-1]["event"] == "done" and built[-1]["image"].startswith("sha256:")
        for verb in (("list",), ("show", NAME), ("runs",), ("gc", "--dry-run")):
            _json_lines(workspace.envmgr("--json", *verb))
    for plain in (("lock", NAME, "--check"), ("build", NAME)):
        proc = workspace.envmgr(*plain, mirror=mirror_a.url)
        assert proc.stdout == "" and proc.stderr.strip(), (plain, proc.stdout)

    # sbom with a cache dir that never saw the build: made from the image's layer-facts label, no layer read
    for json_flag in ([], ["--json"]):
        cold = tmp_path / f"cold-cache{'-json' if json_flag else ''}"
        for state in ("cold", "warm"):
            proc = workspace.envmgr(*json_flag, "sbom", NAME, mirror=mirror_a.url, ENVMGR_CACHE_DIR=str(cold))
            document = json.loads(proc.stdout)
            assert document["bomFormat"] == "CycloneDX"
            assert any(c["name"] == "envmgr-alpha" for c in document["components"])
            assert "back from the engine" not in proc.stderr, (state, proc.stderr)
