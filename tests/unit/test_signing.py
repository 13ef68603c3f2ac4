"""Keys, signatures and the [trust] config: no engine needed."""

from __future__ import annotations

import io
import json
import stat
import tarfile

import pytest

from envmgr.core.config import TrustConfig, load_config
from envmgr.core.errors import UsageError
from envmgr.images.image import tarinfo
from envmgr.ship import signing, trust


@pytest.fixture
def keys(tmp_path):
    site = signing.generate_key(tmp_path / "site")
    other = signing.generate_key(tmp_path / "other")
    return site, other


def test_key_generate_writes_a_private_key_only_its_owner_reads(tmp_path, keys):
    site, _ = keys
    assert stat.S_IMODE((tmp_path / "site").stat().st_mode) == 0o600
    assert (tmp_path / "site.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert site["key_id"].startswith("ed25519:") and len(site["key_id"]) == 24
    with pytest.raises(UsageError, match="already exists"):
        signing.generate_key(tmp_path / "site")


def test_signature_states_trusted_untrusted_invalid_unsigned(tmp_path, keys):
    site, other = keys
    statement = b'{"members": "..."}'
    signed = signing.sign(statement, signing.load_private_key(tmp_path / "site"))
    trusted = TrustConfig(keys=[site["public_key"]], require_signature=True)
    assert signing.check(statement, signed, trusted).state == "trusted"
    assert signing.check(statement, signed, trusted).key_id == site["key_id"]

    by_other = signing.sign(statement, signing.load_private_key(tmp_path / "other"))
    untrusted = signing.check(statement, by_other, trusted)
    assert untrusted.state == "untrusted" and untrusted.key_id == other["key_id"]
    assert other["key_id"] in signing.refusal(untrusted, trusted)
    assert signing.refusal(untrusted, TrustConfig(keys=[site["public_key"]])) is None

    tampered = signing.check(statement + b" ", signed, trusted)
    assert tampered.state == "invalid"
    assert signing.refusal(tampered, TrustConfig()) is not None, "a signature that does not match is always refused"

    # a document that claims the trusted key but carries another public key
    swapped = json.loads(by_other)
    swapped["key_id"] = site["key_id"]
    assert signing.check(statement, json.dumps(swapped).encode(), trusted).state == "invalid"
    assert signing.check(statement, b"not json", trusted).state == "invalid"

    unsigned = signing.check(statement, None, trusted)
    assert unsigned.state == "unsigned" and "not signed" in signing.refusal(unsigned, trusted)
    assert signing.refusal(unsigned, TrustConfig()) is None


def test_trust_section_through_files_and_environment(tmp_path, monkeypatch):
    site = tmp_path / "site.toml"
    site.write_text('[trust]\nkeys = ["/etc/envmgr/site.pub"]\nrequire_signature = false\n')
    config = load_config(files=[site], inherit_host=False)
    assert config.trust.keys == ["/etc/envmgr/site.pub"] and config.trust.require_signature is False
    monkeypatch.setenv("ENVMGR_TRUST_REQUIRE_SIGNATURE", "true")
    monkeypatch.setenv("ENVMGR_TRUST_KEYS", "/a.pub, /b.pub")
    config = load_config(files=[site], inherit_host=False)
    assert config.trust.require_signature is True and config.trust.keys == ["/a.pub", "/b.pub"]
    assert config.origins["trust.require_signature"] == "environment ENVMGR_TRUST_REQUIRE_SIGNATURE"
    bad = tmp_path / "bad.toml"
    bad.write_text('[trust]\nrequire_signatures = true\n')
    with pytest.raises(UsageError, match="require_signatures"):
        load_config(files=[bad], inherit_host=False)


def test_manifest_json_must_carry_exactly_the_archives_tag():
    config = {"rootfs": {"diff_ids": ["sha256:" + "a" * 64, "sha256:" + "b" * 64]}}
    layers = ["a" * 64 + "/layer.tar", "b" * 64 + "/layer.tar"]
    good = [{"Config": "c" * 64 + ".json", "RepoTags": ["envmgr/tiny:0123"], "Layers": layers}]
    trust.check_docker_manifest(None, json.dumps(good).encode(), config, "sha256:" + "c" * 64, "envmgr/tiny:0123")
    extra = [{**good[0], "RepoTags": ["envmgr/tiny:0123", "envmgr/other:latest"]}]
    with pytest.raises(trust.TrustError, match="exactly"):
        trust.check_docker_manifest(None, json.dumps(extra).encode(), config, "sha256:" + "c" * 64,
                                    "envmgr/tiny:0123")
    two = good + good
    with pytest.raises(trust.TrustError, match="exactly one image"):
        trust.check_docker_manifest(None, json.dumps(two).encode(), config, "sha256:" + "c" * 64, "envmgr/tiny:0123")
    other_layers = [{**good[0], "Layers": list(reversed(layers))}]
    with pytest.raises(trust.TrustError, match="other layers"):
        trust.check_docker_manifest(None, json.dumps(other_layers).encode(), config, "sha256:" + "c" * 64,
                                    "envmgr/tiny:0123")


def test_member_list_config_hash_must_be_the_image_id():
    image = "c" * 64
    members = [{"name": f"{image}.json", "sha256": image}, {"name": "a" * 64 + "/layer.tar", "sha256": "a" * 64},
               {"name": "manifest.json", "sha256": "0"}]
    trust.check_structure("x.tar", {"image_id": f"sha256:{image}", "members": members})
    with pytest.raises(trust.TrustError, match="not image"):
        trust.check_structure("x.tar", {"image_id": "sha256:" + "d" * 64, "members": members})
    with pytest.raises(trust.TrustError, match="another hash"):
        trust.check_structure("x.tar", {"image_id": f"sha256:{image}",
                                        "members": [*members[:1], {**members[1], "sha256": "e" * 64}, members[2]]})
    with pytest.raises(trust.TrustError, match="twice"):
        trust.check_structure("x.tar", {"image_id": f"sha256:{image}", "members": members + members[:1]})


def _layer(path, entries):
    with tarfile.open(path, "w") as tar:
        for name, kind, body in entries:
            if kind == "dir":
                tar.addfile(tarinfo(name, tarfile.DIRTYPE, 0o755))
            elif kind == "link":
                tar.addfile(tarinfo(name, tarfile.SYMTYPE, 0o777, linkname=body))
            else:
                tar.addfile(tarinfo(name, tarfile.REGTYPE, 0o755 if kind == "exe" else 0o644, len(body)),
                            io.BytesIO(body))


def test_method_files_come_from_the_method_layer_and_never_leave_the_folder(tmp_path):
    layer = tmp_path / "method.tar"
    _layer(layer, [("opt/envmgr/method", "dir", b""), ("opt/envmgr/method/main.py", "file", b"print(1)\n"),
                   ("opt/envmgr/method/run.sh", "exe", b"#!/bin/sh\n"), ("opt/envmgr/method/l", "link", "main.py"),
                   ("opt/envmgr/method/envmgr.toml", "file", b"from the layer"), ("etc/envmgr/method.json", "file", b"{}"),
                   ("usr/local/bin/conda", "exe", b"shim")])
    source = tmp_path / "m"
    source.mkdir()
    (source / "envmgr.toml").write_text("staged")
    trust.extract_method_files(layer, source, lambda rel: (source / rel).exists())
    assert (source / "main.py").read_text() == "print(1)\n" and (source / "run.sh").stat().st_mode & 0o111
    assert (source / "l").is_symlink() and (source / "envmgr.toml").read_text() == "staged"
    assert sorted(p.name for p in source.iterdir()) == ["envmgr.toml", "l", "main.py", "run.sh"]

    escape = tmp_path / "escape.tar"
    _layer(escape, [("opt/envmgr/method/../../../../tmp/evil", "file", b"x")])
    with pytest.raises(trust.TrustError, match="would leave"):
        trust.extract_method_files(escape, tmp_path / "n", lambda rel: False)
    through = tmp_path / "through.tar"
    _layer(through, [("opt/envmgr/method/l", "link", "/etc"), ("opt/envmgr/method/l", "file", b"x")])
    (tmp_path / "o").mkdir()
    with pytest.raises(trust.TrustError, match="twice"):
        trust.extract_method_files(through, tmp_path / "o", lambda rel: False)
    assert not (tmp_path / "o" / "l").is_symlink()


def test_a_trusted_signature_record_is_never_replaced_by_a_weaker_one(tmp_path, keys):
    from types import SimpleNamespace

    site, _ = keys
    ctx = SimpleNamespace(cache_dir=tmp_path / "cache",
                          config=SimpleNamespace(trust=TrustConfig(keys=[site["public_key"]])))
    image = "sha256:" + "c" * 64
    layer = "sha256:" + "a" * 64
    statement = trust.image_statement("m", "envmgr/m:0123", image, "9" * 64, [layer])
    assert trust.signature_report(ctx, image, [layer])["state"] == "unsigned"
    trust.record_signature(ctx, image, "image", statement, signing.sign(statement, signing.load_private_key(
        tmp_path / "site")))
    report = trust.signature_report(ctx, image, [layer])
    assert report["state"] == "trusted" and report["layers_match"] and report["ok"]
    trust.record_signature(ctx, image, "image", statement, None)
    trust.record_signature(ctx, image, "image", statement, signing.sign(statement, signing.load_private_key(
        tmp_path / "other")))
    assert trust.signature_report(ctx, image, [layer])["state"] == "trusted"
    assert not trust.signature_report(ctx, image, ["sha256:" + "b" * 64])["layers_match"]


def test_the_signature_is_read_from_plain_and_gzip_archives(tmp_path, keys):
    import gzip

    manifest = b'{"format": "envmgr-export/2", "members": []}'
    signature = signing.sign(manifest, signing.load_private_key(tmp_path / "site"))
    plain = tmp_path / "a.tar"
    with tarfile.open(plain, "w") as tar:
        for name, body in (("envmgr/export.json", manifest), (trust.SIGNATURE_MEMBER, signature),
                           ("manifest.json", b"[]")):
            tar.addfile(tarinfo(name, tarfile.REGTYPE, 0o644, len(body)), io.BytesIO(body))
    packed = tmp_path / "a.tar.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes(), mtime=0))
    for path in (plain, packed):
        got_manifest, got_signature = trust.read_head(path, "envmgr/export.json")
        assert got_manifest == manifest and got_signature == signature
    unsigned = tmp_path / "b.tar"
    with tarfile.open(unsigned, "w") as tar:
        tar.addfile(tarinfo("envmgr/export.json", tarfile.REGTYPE, 0o644, len(manifest)), io.BytesIO(manifest))
    assert trust.read_head(unsigned, "envmgr/export.json") == (manifest, None)
    with pytest.raises(trust.TrustError, match="not a readable envmgr export"):
        trust.read_head(tmp_path / "site.pub", "envmgr/export.json")


def test_a_pulled_image_must_be_the_one_its_signature_names():
    layers = ["sha256:" + "a" * 64, "sha256:" + "b" * 64]
    statement = trust.image_statement("m", "envmgr/m:0123", "sha256:" + "c" * 64, "9" * 64, layers)
    pulled = {"Id": "sha256:" + "c" * 64, "RootFS": {"Layers": list(reversed(layers))}}
    trust.check_pulled(statement, pulled, "m", "envmgr/m:0123")
    with pytest.raises(trust.TrustError, match="is not the signed"):
        trust.check_pulled(statement, {**pulled, "Id": "sha256:" + "d" * 64}, "m", "envmgr/m:0123")
    with pytest.raises(trust.TrustError, match="is not the signed"):
        trust.check_pulled(statement, {**pulled, "RootFS": {"Layers": layers[:1]}}, "m", "envmgr/m:0123")
    with pytest.raises(trust.TrustError, match="not m envmgr/m:4567"):
        trust.check_pulled(statement, pulled, "m", "envmgr/m:4567")   # another method's signature, swapped in
