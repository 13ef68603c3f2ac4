"""Signed archives and pulls, strict import, SBOM: what a server that reaches nothing can trust.

A source server builds `tiny-trust` (a copy of the `tiny` fixture under its own image name) and
exports it signed by the site key. A second server (fresh base dir, cache and store, same engine)
trusts only the site key and requires signatures. Forged archives are made the way an attacker
would: re-hash everything that is not signed.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest

from tests.integration.conftest import TINY_MAIN, TINY_PYPROJECT, TINY_SPEC, Workspace
from tests.integration.test_transfer import _start_registry

pytestmark = pytest.mark.engine

NAME = "tiny-trust"
REPO = f"envmgr/{NAME}"
VICTIM = "envmgr/tiny-trust-victim"


def _done(proc) -> dict:
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"event": "done"')][-1]


def _server(root: Path, store: Path | None = None) -> Workspace:
    ws = Workspace(root / "base", root / "cache", store or root / "store")
    ws.method_dir = root / "base" / "methods" / NAME
    return ws


def _remove_images(engine, repo: str = REPO) -> None:
    for image in engine.images.list(repo):
        engine.images.remove(image.id, force=True)


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("keys")
    found = {}
    for who in ("site", "attacker"):
        proc = Workspace(root, root / "cache", root).envmgr("key", "generate", str(root / who))
        assert "key ed25519:" in proc.stderr   # a status line: on stderr
        found[who] = root / who
    return found


@pytest.fixture(scope="module")
def source(tmp_path_factory, store, engine, mirror_a):
    root = tmp_path_factory.mktemp("trust-source")
    ws = _server(root, store)
    ws.method_dir.mkdir(parents=True)
    (ws.method_dir / "envmgr.toml").write_text(TINY_SPEC.replace('name = "tiny"', f'name = "{NAME}"'))
    (ws.method_dir / "pyproject.toml").write_text(TINY_PYPROJECT)
    (ws.method_dir / "main.py").write_text(TINY_MAIN)
    ws.envmgr("lock", NAME, mirror=mirror_a.url)
    ws.built = _done(ws.envmgr("--json", "build", NAME, mirror=mirror_a.url))
    yield ws
    _remove_images(engine)
    _remove_images(engine, VICTIM)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def signed(source, keys, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("signed") / f"{NAME}.envmgr.tar"
    done = _done(source.envmgr("--json", "export", NAME, "-o", str(out), "--sign", str(keys["site"])))
    assert done["signed_by"].startswith("ed25519:")
    return out


def _ours(engine) -> list[tuple[str, tuple[str, ...]]]:
    return sorted((i.id, tuple(sorted(i.tags))) for repo in (REPO, VICTIM) for i in engine.images.list(repo))


def _strict(keys, *trusted: str) -> dict[str, str]:
    return {"ENVMGR_TRUST_KEYS": ",".join(f"{keys[k]}.pub" for k in trusted),
            "ENVMGR_TRUST_REQUIRE_SIGNATURE": "true"}


# ----------------------------------------------------------------------------- forging


def _read(archive: Path) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    with tarfile.open(archive) as tar:
        return [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]


def _write(items, out: Path) -> None:
    with tarfile.open(out, "w") as tar:
        for member, body in items:
            member.size = len(body) if body is not None else 0
            tar.addfile(member, io.BytesIO(body) if body is not None else None)


def _trojan_layer(layer: bytes) -> bytes:
    """The method layer with main.py replaced (same entry names and order)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(layer)) as src, tarfile.open(fileobj=out, mode="w",
                                                                      format=tarfile.GNU_FORMAT) as dst:
        for info in src.getmembers():
            body = src.extractfile(info).read() if info.isfile() else None
            if info.name == "opt/envmgr/method/main.py":
                body = b"import os\nos.system('echo pwned')\n" + body
                info.size = len(body)
            dst.addfile(info, io.BytesIO(body) if body is not None else None)
    return out.getvalue()


def forge(archive: Path, out: Path, *, trojan: bool = False, extra_tags: tuple[str, ...] = (),
          sign_with: Path | None = None, signature: bytes | None | str = "drop") -> None:
    """Rewrite an archive as an attacker would: change it, then re-hash everything that is not signed
    (layer, config, image ID, manifest.json, the member list). `signature`: "drop", "keep" or bytes."""
    items = _read(archive)
    manifest = json.loads(items[0][1])
    bodies = {m.name: b for m, b in items}
    old_config_name = manifest["image_id"].split(":")[1] + ".json"
    config = json.loads(bodies[old_config_name])
    renames: dict[str, tuple[str, bytes]] = {}
    if trojan:
        old_diff = config["rootfs"]["diff_ids"][-1]
        old_name = f"{old_diff.split(':')[1]}/layer.tar"
        layer = _trojan_layer(bodies[old_name])
        new_hex = hashlib.sha256(layer).hexdigest()
        config["rootfs"]["diff_ids"][-1] = f"sha256:{new_hex}"
        renames[old_name] = (f"{new_hex}/layer.tar", layer)
        renames[old_name.split("/")[0]] = (new_hex, b"")
    config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    config_hex = hashlib.sha256(config_bytes).hexdigest()
    renames[old_config_name] = (f"{config_hex}.json", config_bytes)
    docker = json.loads(bodies["manifest.json"])
    docker[0]["Config"] = f"{config_hex}.json"
    docker[0]["Layers"] = [f"{d.split(':')[1]}/layer.tar" for d in config["rootfs"]["diff_ids"]]
    docker[0]["RepoTags"] += list(extra_tags)
    renames["manifest.json"] = ("manifest.json", json.dumps(docker).encode())
    manifest["image_id"] = f"sha256:{config_hex}"
    for entry in manifest["members"]:
        if entry["name"] in renames:
            name, body = renames[entry["name"]]
            entry.update(name=name, size=len(body), sha256=hashlib.sha256(body).hexdigest())
    manifest_bytes = json.dumps(manifest, indent=1, sort_keys=True).encode()
    if sign_with is not None:
        from envmgr.ship import signing

        signature = signing.sign(manifest_bytes, signing.load_private_key(sign_with))
    result = []
    for member, body in items:
        if member.name == "envmgr/export.json":
            body = manifest_bytes
        elif member.name == "envmgr/signature.json":
            if signature == "drop":
                continue
            body = body if signature == "keep" else signature
        elif member.name in renames:
            member.name, new_body = renames[member.name]
            body = new_body if member.isfile() else None
        result.append((member, body))
    if isinstance(signature, bytes) and not any(m.name == "envmgr/signature.json" for m, _ in result):
        info = tarfile.TarInfo("envmgr/signature.json")
        result.insert(1, (info, signature))
    _write(result, out)


# ----------------------------------------------------------------------------- tests


def test_signed_export_imports_under_require_signature_and_verify_reports_the_signer(source, signed, keys,
                                                                                     tmp_path, engine):
    _remove_images(engine)
    target = _server(tmp_path / "server2")
    strict = _strict(keys, "site")
    imported = _done(target.envmgr("--json", "import", str(signed), **strict))
    assert imported["signature"]["state"] == "trusted"
    assert engine.images.get(source.built["tag"]).id == source.built["image"]
    ok = _done(target.envmgr("--json", "verify", NAME, "--no-rebuild", **strict))
    assert ok["signature"]["state"] == "trusted" and ok["signature"]["layers_match"] and ok["ok"]
    plain = target.envmgr("verify", NAME, "--no-rebuild", **strict)
    assert "signature: signed by trusted key ed25519:" in plain.stdout + plain.stderr

    # the SBOM travelled with the archive, covered by the signature
    sbom = json.loads(target.envmgr("sbom", NAME, "--format", "cyclonedx-json", **strict).stdout)
    assert sbom["bomFormat"] == "CycloneDX" and sbom["metadata"]["component"]["bom-ref"] == source.built["image"]
    names = {c["name"]: c for c in sbom["components"]}
    assert names["envmgr-alpha"]["version"] == "1.0" and names["envmgr-beta"]["version"] == "1.1"
    assert names["envmgr-beta"]["hashes"][0]["alg"] == "SHA-256"
    locked = {p["name"]: p["value"] for p in names["envmgr-beta"]["properties"]}["envmgr:lock-file-sha256"]
    assert len(locked.split()[0]) == 64
    assert names["python3.11-minimal"]["purl"].startswith("pkg:deb/debian/python3.11-minimal@")
    assert source.envmgr("sbom", NAME).stdout == target.envmgr("sbom", NAME, **strict).stdout

    # a server that trusts only another key refuses it, naming the key that signed
    other = _server(tmp_path / "server3")
    _remove_images(engine)
    refused = other.envmgr("import", str(signed), check=False, **_strict(keys, "attacker"))
    assert refused.returncode == 2 and "not in [trust] keys" in refused.stderr, refused.stderr
    assert not engine.images.list(REPO)


def test_forged_archives_are_refused_and_nothing_moves(source, signed, keys, tmp_path, engine):
    _remove_images(engine)
    target = _server(tmp_path / "server2")
    strict = _strict(keys, "site")
    target.envmgr("import", str(signed), **strict)
    legit = source.built["image"]
    # another method's tag, which the extra-tag forgery tries to hijack
    engine.images.get(legit).tag(VICTIM, "latest")
    victim = engine.images.get(f"{VICTIM}:latest").id
    before = _ours(engine)
    method_dir = target.base_dir / "methods" / NAME
    files_before = {p.name: p.read_bytes() for p in method_dir.iterdir() if p.is_file()}

    attacker_key = keys["attacker"]
    other = tmp_path / "other.tar"      # a second, differently signed archive to take a signature from
    forge(signed, other, extra_tags=(), sign_with=keys["site"])
    with tarfile.open(other) as tar:
        foreign_signature = tar.extractfile("envmgr/signature.json").read()
    cases = {
        "trojan, re-hashed, signature kept": (dict(trojan=True, signature="keep"), strict,
                                              "signature does not match"),
        "trojan, re-hashed, unsigned": (dict(trojan=True), strict, "not signed by any key"),
        "trojan, re-hashed, signed by the attacker": (dict(trojan=True, sign_with=attacker_key), strict,
                                                      "not in [trust] keys"),
        "trojan, unsigned, no require_signature": (dict(trojan=True), {}, "other inputs than its manifest"),
        "extra tag, signed by the attacker": (dict(extra_tags=(f"{VICTIM}:latest",), sign_with=attacker_key),
                                              strict, "not in [trust] keys"),
        "swapped signature": (dict(trojan=True, signature=foreign_signature), strict, "signature does not match"),
    }
    refused = 0
    for label, (how, env, expected) in cases.items():
        forged = tmp_path / f"forged-{refused}.tar"
        forge(signed, forged, **how)
        proc = target.envmgr("import", str(forged), "--replace", check=False, **env)
        assert proc.returncode == 2, (label, proc.stdout, proc.stderr)
        assert expected in proc.stderr and "nothing was loaded" in proc.stderr, (label, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert _ours(engine) == before, f"{label}: an image or tag moved"
        assert engine.images.get(source.built["tag"]).id == legit
        assert engine.images.get(f"{VICTIM}:latest").id == victim
        assert {p.name: p.read_bytes() for p in method_dir.iterdir() if p.is_file()} == files_before, label
        assert not list((target.base_dir / "methods").glob(".import-*"))
        refused += 1
    verified = _done(target.envmgr("--json", "verify", NAME, "--no-rebuild", **strict))
    assert verified["ok"] and verified["in_use"] == legit

    # Without require_signature, an extra tag is still refused by the strict manifest check (the image is
    # not here under its own tag, so the import reads the whole archive and would load it).
    for tag in [t for t in engine.images.get(legit).tags if t.startswith(REPO + ":")]:
        engine.api.remove_image(tag)
    forged = tmp_path / "forged-extra-tag-unsigned.tar"
    forge(signed, forged, extra_tags=(f"{VICTIM}:latest",))
    proc = target.envmgr("import", str(forged), check=False)
    assert proc.returncode == 2 and "but the archive's inputs give exactly" in proc.stderr, proc.stderr
    assert not engine.images.list(REPO) and engine.images.get(f"{VICTIM}:latest").id == victim
    refused += 1
    print(f"\nforged archives: {len(cases) + 1} tried, {refused} refused")
    assert refused == len(cases) + 1


def test_signed_push_pulls_under_require_signature_and_a_foreign_key_is_refused(source, keys, tmp_path,
                                                                                engine):
    source.envmgr("build", NAME)   # earlier tests removed the image from the engine
    proc, registry = _start_registry(tmp_path / "registry")
    try:
        pushed = _done(source.envmgr("--json", "push", NAME, registry, "--sign", str(keys["site"])))
        assert pushed["signed_by"].startswith("ed25519:")
        _remove_images(engine)
        refused = source.envmgr("pull", NAME, registry, check=False, **_strict(keys, "attacker"))
        assert refused.returncode == 2 and pushed["signed_by"] in refused.stderr, refused.stderr
        assert not engine.images.list(REPO), "a refused pull loaded or tagged the image"
        pulled = _done(source.envmgr("--json", "pull", NAME, registry, **_strict(keys, "site")))
        assert pulled["signature"]["state"] == "trusted" and pulled["image_id"] == source.built["image"]
        verified = _done(source.envmgr("--json", "verify", NAME, "--no-rebuild", **_strict(keys, "site")))
        assert verified["signature"]["state"] == "trusted" and verified["signature"]["layers_match"]
        assert not [t for i in engine.images.list() for t in i.tags if t.startswith(registry)]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# ----------------------------------------------------------------------------- gc of SBOMs and signatures


def test_gc_removes_sboms_and_signature_records_of_gone_images_only(source, signed, keys, tmp_path, engine):
    target = _server(tmp_path / "server2")
    strict = _strict(keys, "site")
    _done(target.envmgr("--json", "import", str(signed), **strict))
    image = source.built["image"].removeprefix("sha256:")
    sbom_dir, signatures = target.cache_dir / "sbom", target.cache_dir / "signatures"
    live = [sbom_dir / f"{image}.cdx.json", signatures / f"{image}.json"]
    assert all(p.is_file() for p in live), list(target.cache_dir.rglob("*"))
    # the records an earlier image of this method left when it was removed: same method, an ID the engine lacks
    gone_id = hashlib.sha256(b"an image removed earlier").hexdigest()
    gone = [sbom_dir / f"{gone_id}.cdx.json", signatures / f"{gone_id}.json"]
    for src, dst in zip(live, gone, strict=True):
        shutil.copyfile(src, dst)

    dry = _done(target.envmgr("--json", "gc", "--method", NAME, "--dry-run", **strict))
    listed = {(i["kind"], i["what"]) for i in dry["removed"]}
    assert {("sbom", str(gone[0])), ("signature", str(gone[1]))} <= listed
    assert not {str(p) for p in live} & {what for _, what in listed}
    assert all(p.is_file() for p in gone)
    said = target.envmgr("gc", "--method", NAME, "--dry-run", **strict)
    plain = said.stdout + said.stderr   # what gc would do is talk: on stderr
    assert f"would remove sbom: {gone[0]}" in plain and f"would remove signature: {gone[1]}" in plain

    done = _done(target.envmgr("--json", "gc", "--method", NAME, **strict))
    assert {("sbom", str(gone[0])), ("signature", str(gone[1]))} <= {(i["kind"], i["what"]) for i in done["removed"]}
    assert not any(p.exists() for p in gone) and all(p.is_file() for p in live)
    assert engine.images.get(source.built["tag"]).id == source.built["image"]
    ok = _done(target.envmgr("--json", "verify", NAME, "--no-rebuild", **strict))
    assert ok["signature"]["state"] == "trusted" and ok["ok"]
