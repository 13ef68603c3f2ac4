"""Untrusted names and paths (envmgr/core/names.py), the archive's export.json, lock files, trusted keys.

Property tests: whatever text arrives from outside, a name that passes is one plain component that
stays under its root, and an archive whose export.json names a path creates nothing.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from pydantic import ValidationError

from envmgr.core import names, spec
from envmgr.core.config import TrustConfig
from envmgr.core.errors import UsageError
from envmgr.core.files import open_lock
from envmgr.images.image import tarinfo
from envmgr.runs import inputs as run_inputs, records
from envmgr.ship import signing, transfer

PATTERNS = [names.METHOD, names.RUN_ID, names.INPUT, names.ENV_VAR, names.DEB_PACKAGE, names.DIGEST]
GOOD = {names.METHOD: "sd-demo", names.RUN_ID: "20261129-204839-1a2b", names.INPUT: "cfg.json",
        names.ENV_VAR: "CONFIG_ENV", names.DEB_PACKAGE: "libgl1", names.DIGEST: "sha256:" + "a" * 64}


@pytest.mark.parametrize("pattern", PATTERNS)
def test_a_valid_name_with_a_trailing_newline_is_refused_everywhere(pattern):
    good = GOOD[pattern]
    assert names.is_valid(pattern, good)
    for bad in (good + "\n", "\n" + good, good + "\0", good + " ", good + "\n-o"):
        assert not names.is_valid(pattern, bad), repr(bad)


def test_the_modules_that_check_names_refuse_a_trailing_newline():
    assert spec.name_problem("tiny\n") is not None
    with pytest.raises(UsageError):
        records.check_run_id("20261129-204839-1a2b\n")
    assert run_inputs.env_problem("HOME_DIR\n") is not None
    with pytest.raises(UsageError):
        run_inputs.parse_env(["NAME\n=1"])
    with pytest.raises(ValidationError):
        spec.MethodSpec(name="third", entry=["bash"], system={"apt": ["acl\n", "id"]})
    with pytest.raises(ValidationError):
        spec.MethodSpec(name="third", entry=["bash"], variants={"cu128\n": {"pin": {"torch": "2.10.0"}}})


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(min_size=0, max_size=80))
def test_any_text_that_passes_as_a_name_is_one_plain_component(text):
    for pattern in (names.METHOD, names.INPUT, names.RUN_ID, names.BASE_IMAGE):
        if names.is_valid(pattern, text):
            assert names.is_component(text)
            assert "\n" not in text and "/" not in text and text not in (".", "..")


@given(parts=st.lists(st.text(min_size=0, max_size=30), min_size=1, max_size=4))
def test_beneath_never_leaves_its_root_and_creates_nothing(parts):
    root = Path("/nonexistent-envmgr-root/methods")
    try:
        joined = names.beneath(root, *parts)
    except UsageError:
        return
    assert joined.is_relative_to(root) and joined != root
    assert Path(os.path.normpath(joined)).is_relative_to(root)
    assert not root.exists()


@pytest.mark.parametrize("bad", ["/root/.ssh", "../escape", "..", ".", "", "a/b", "tiny\n"])
def test_beneath_refuses_names_that_are_not_one_component(bad, tmp_path):
    with pytest.raises(UsageError, match="not a plain name"):
        names.beneath(tmp_path, bad)


# ------------------------------------------------------------------------------ export.json


def _manifest(**changes) -> dict:
    manifest = {
        "format": transfer.FORMAT, "method": "tiny", "tag": "envmgr/tiny:" + "0" * 16,
        "image_id": "sha256:" + "1" * 64, "architecture": "amd64", "os": "linux", "inputs": {"lock": "x"},
        "base": {"name": "bookworm-py311", "image_id": "sha256:" + "2" * 64, "diff_id": "sha256:" + "3" * 64,
                 "python": "/usr/bin/python3.11", "python_version": "3.11.2", "packages": {}},
        "members": [{"name": "manifest.json", "part": "docker-archive manifest", "size": 2,
                     "sha256": "4" * 64, "mode": 0o644}],
    }
    for key, value in changes.items():
        if key.startswith("base_"):
            manifest["base"][key[5:]] = value
        else:
            manifest[key] = value
    return manifest


def _archive(path: Path, manifest: dict) -> Path:
    body = json.dumps(manifest).encode()
    with tarfile.open(path, "w") as tar:
        tar.addfile(tarinfo(transfer.MANIFEST, tarfile.REGTYPE, 0o644, len(body)), io.BytesIO(body))
    return path


def test_a_well_formed_manifest_passes():
    transfer.check_manifest_fields(Path("a.tar"), _manifest())


@pytest.mark.parametrize("changes", [
    {"method": "/root/.ssh"}, {"method": "../../escape"}, {"method": "tiny\n"}, {"method": "base-x"},
    {"method": 7}, {"base_name": "../../etc"}, {"base_name": "/etc"}, {"image_id": "sha256:../x"},
    {"tag": "envmgr/tiny:../../x"}, {"members": [{"name": "a\nb", "part": "x", "size": 1, "sha256": "4" * 64}]},
    {"members": [{"name": "a", "part": "x", "size": -1, "sha256": "4" * 64}]}, {"inputs": {"lock": 1}},
])
def test_a_forged_manifest_is_refused_before_any_name_is_used(changes):
    with pytest.raises(transfer.ArchiveError, match="nothing was loaded"):
        transfer.check_manifest_fields(Path("a.tar"), _manifest(**changes))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.text(min_size=1, max_size=40), base=st.text(min_size=1, max_size=40))
def test_import_of_any_forged_name_writes_nothing_outside_the_methods_folder(tmp_path_factory, name, base):
    """import_archive refuses a forged manifest before it touches the engine or the disk."""
    root = tmp_path_factory.mktemp("server")
    archive = _archive(root / "forged.tar", _manifest(method=name, base_name=base))

    class Ctx:   # nothing beyond the manifest check may be reached for an invalid name
        def __getattr__(self, item):
            raise AssertionError(f"import went on to use ctx.{item} with method {name!r}, base {base!r}")

    valid = names.is_valid(names.METHOD, name) and not name.startswith("base-") \
        and names.is_valid(names.BASE_IMAGE, base)
    if valid:
        return
    with pytest.raises(transfer.ArchiveError):
        transfer.import_archive(Ctx(), archive)   # type: ignore[arg-type]
    assert sorted(p.name for p in root.iterdir()) == ["forged.tar"]


# ------------------------------------------------------------------------------ lock files and keys


def test_a_lock_file_is_never_opened_through_a_link(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    planted = tmp_path / "envmgr-image-0123.lock"
    planted.symlink_to(victim)
    with pytest.raises(UsageError, match="symbolic link"):
        open_lock(planted)
    assert victim.read_text() == "keep me"
    with open_lock(tmp_path / "fresh.lock") as guard:
        assert guard.fileno() > 0


def test_trust_follows_the_whole_public_key_not_its_short_id(tmp_path, monkeypatch):
    site = signing.generate_key(tmp_path / "site")
    signing.generate_key(tmp_path / "attacker")
    statement = b'{"members": "..."}'
    trusted = TrustConfig(keys=[site["public_key"]], require_signature=True)
    # a 64-bit key ID can collide: make every key's ID the same, as a collision would
    monkeypatch.setattr(signing, "key_id", lambda public: "ed25519:0000000000000000")
    forged = signing.sign(statement, signing.load_private_key(tmp_path / "attacker"))
    found = signing.check(statement, forged, trusted)
    assert found.state == "untrusted", "a key whose short ID matches is not the trusted key"
    assert signing.refusal(found, trusted) is not None
    genuine = signing.sign(statement, signing.load_private_key(tmp_path / "site"))
    assert signing.check(statement, genuine, trusted).state == "trusted"


def test_a_spec_with_a_newline_or_option_looking_apt_name_is_refused_before_any_step(tmp_path):
    """The hostile spec of the apt step: `build` stops at the spec, naming the field; no engine is asked."""
    import subprocess
    import sys

    for bad in ('"acl\\n", "id"', '"-oAPT::Update::Pre-Invoke::=id"', '"acl id"'):
        method = tmp_path / "base" / "methods" / "hostile"
        method.mkdir(parents=True, exist_ok=True)
        (method / "envmgr.toml").write_text(f'name = "hostile"\nbackend = "pip"\nentry = ["true"]\n'
                                            f"[system]\napt = [{bad}]\n")
        env = {**os.environ, "ENVMGR_CONFIG": "/dev/null", "ENVMGR_BASE_DIR": str(tmp_path / "base"),
               "ENVMGR_CACHE_DIR": str(tmp_path / "cache"), "DOCKER_HOST": "unix:///nonexistent.sock"}
        proc = subprocess.run([sys.executable, "-m", "envmgr", "build", "hostile"], capture_output=True,
                              text=True, env=env)
        assert proc.returncode == 2, proc.stderr
        assert "apt" in proc.stderr and "Debian package name" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
