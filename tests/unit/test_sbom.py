"""The SBOM read from layers and a lock, without an engine."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from envmgr.build import sbom
from envmgr.images.image import tarinfo

STATUS = """\
Package: libc6
Status: install ok installed
Architecture: amd64
Version: 2.36-9+deb12u9
Description: GNU C Library
 continued description line: Version: 0.0

Package: removed-one
Status: deinstall ok config-files
Version: 1.0

Package: python3.11-minimal
Status: install ok installed
Architecture: amd64
Version: 3.11.2-6+deb12u6
"""


def _tar(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, body in files.items():
            tar.addfile(tarinfo(name, tarfile.REGTYPE, 0o644, len(body)), io.BytesIO(body))
    return path


def test_debian_packages_are_the_installed_ones_with_versions():
    found = {c.name: c for c in sbom.debian_components(STATUS)}
    assert sorted(found) == ["libc6", "python3.11-minimal"]
    assert found["libc6"].version == "2.36-9+deb12u9"
    assert str(found["libc6"].purl) == "pkg:deb/debian/libc6@2.36-9%2Bdeb12u9?arch=amd64"


def test_python_and_conda_packages_come_from_the_environment_layer(tmp_path):
    site = "opt/envmgr/envs/m/lib/python3.11/site-packages"
    layer = _tar(tmp_path / "env.tar", {
        f"{site}/Envmgr_Beta-1.1.dist-info/METADATA": b"Metadata-Version: 2.1\nName: envmgr-beta\nVersion: 1.1\n",
        f"{site}/Envmgr_Beta-1.1.dist-info/RECORD": b"envmgr_beta/__init__.py,sha256=abc,10\n",
        "opt/envmgr/envs/m/conda-meta/zlib-1.3-h0.json": json.dumps(
            {"name": "zlib", "version": "1.3", "build": "h0", "sha256": "f" * 64, "subdir": "linux-64"}).encode(),
    })
    python = sbom.python_components(layer, {"envmgr-beta": ["a" * 64, "b" * 64]})
    assert [(c.name, c.version) for c in python] == [("envmgr-beta", "1.1")]
    props = {p.name: p.value for p in python[0].properties}
    assert props["envmgr:lock-file-sha256"] == f"{'a' * 64} {'b' * 64}"
    assert len(next(iter(python[0].hashes)).content) == 64
    conda = sbom.conda_components(layer)
    assert [(c.name, c.version, next(iter(c.hashes)).content) for c in conda] == [("zlib", "1.3", "f" * 64)]


def test_the_same_image_gives_the_same_sbom_bytes(tmp_path):
    from envmgr.core.spec import load_spec
    from envmgr.images.base import BaseImage
    from envmgr.images.image import ImageConfig, Layer

    base_tar = _tar(tmp_path / "base.tar", {"var/lib/dpkg/status": STATUS.encode()})
    env_tar = _tar(tmp_path / "env.tar", {})
    layers = [Layer(base_tar, "sha256:" + "1" * 64, 1), Layer(env_tar, "sha256:" + "2" * 64, 1)]
    config = ImageConfig(layers=layers, labels={"org.envmgr.inputs-hash": "9" * 64})
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "envmgr.toml").write_text('name = "m"\nbackend = "poetry"\nentry = ["python", "x.py"]\n')
    spec = load_spec(folder / "envmgr.toml", builtin=False)
    base = BaseImage(name="b", image_id="sha256:" + "3" * 64, diff_id="sha256:" + "1" * 64,
                     layer_path=str(base_tar), python="/usr/bin/python3.11", python_version="3.11.2", packages={})
    first, second = sbom.generate(spec, base, config), sbom.generate(spec, base, config)
    assert first == second
    document = json.loads(first)
    assert document["bomFormat"] == "CycloneDX" and document["specVersion"] == "1.6"
    assert document["metadata"]["component"]["bom-ref"] == config.image_id()
    assert {c["name"] for c in document["components"]} == {"libc6", "python3.11-minimal"}
