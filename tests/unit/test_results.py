"""Verb results as values: what verify, doctor, export, import, push and pull report, decided outside the CLI."""

from __future__ import annotations

import json
from pathlib import Path

from envmgr.core.errors import Exit
from envmgr.face.doctor import Check, exit_code
from envmgr.ship.registry import PullResult, PushResult
from envmgr.ship.transfer import ExportResult, ImportResult
from envmgr.ship.verify import VerifyResult

IMAGE = "sha256:" + "1" * 64


def _verify(**changes) -> VerifyResult:
    fields = dict(method="m", tag="envmgr/m:abc", in_use="sha256:" + "1" * 64, in_use_ref="envmgr/m:abc",
                  packages=3, files=40, bad_files=[])
    return VerifyResult(**{**fields, **changes})


def test_verify_without_rebuild_passes_on_files_alone_and_reports_no_image_keys():
    result = _verify()
    assert result.ok
    assert "rebuilt" not in result.fields() and result.fields()["files_match"] is True
    assert result.report() == ["files: 40 files of 3 packages checked, 0 differ from their RECORD"]


def test_verify_failure_names_the_image_and_the_files():
    result = _verify(rebuilt="sha256:" + "2" * 64, image_matches=False,
                     bad_files=[["six-1.16.0.dist-info", "six.py", "changed"]])
    assert not result.ok and result.fields()["ok"] is False
    assert result.failure() == "m: verification failed: image ID differs, 1 files differ"
    assert result.report()[0].startswith("image: DIFFERENT") and "  changed: six.py (six-1.16.0.dist-info)" in result.report()


def test_doctor_exit_code_is_engine_when_the_engine_check_fails():
    assert exit_code([Check("engine", "up", True), Check("tools", "present", True)]) == Exit.OK
    assert exit_code([Check("engine", "down", False), Check("tools", "missing", False)]) == Exit.ENGINE
    assert exit_code([Check("engine", "up", True), Check("tools", "missing", False)]) == Exit.FAILED


def test_export_fields_name_the_file_as_text_and_the_size_as_bytes():
    result = ExportResult("m", Path("out/m-abc.envmgr.tar"), "envmgr/m:abc", IMAGE, 12_345_678, "none")
    fields = result.fields()
    assert fields == {"method": "m", "file": "out/m-abc.envmgr.tar", "tag": "envmgr/m:abc", "image_id": IMAGE,
                      "bytes": 12_345_678, "compress": "none", "signed_by": None}
    json.dumps(fields)   # the event is JSON without a fallback for Path
    assert ExportResult("m", Path("x"), "t", IMAGE, 1, "gzip", signed_by="ab12").fields()["signed_by"] == "ab12"


def test_import_fields_say_what_changed_only_when_something_did():
    unsigned = {"state": "unsigned", "key_id": None}
    same = ImportResult("m", "envmgr/m:abc", IMAGE, changed=False, signature=unsigned)
    assert same.fields() == {"method": "m", "tag": "envmgr/m:abc", "image_id": IMAGE, "changed": False,
                             "signature": unsigned}
    new = ImportResult("m", "envmgr/m:abc", IMAGE, changed=True, signature=unsigned, registered=True,
                       base_installed=False, loaded=True)
    assert new.fields() == {"method": "m", "tag": "envmgr/m:abc", "image_id": IMAGE, "changed": True,
                            "registered": True, "base_installed": False, "loaded": True, "signature": unsigned}
    assert list(new.fields()) == ["method", "tag", "image_id", "changed", "registered", "base_installed",
                                  "loaded", "signature"]


def test_push_fields_leave_out_signed_by_when_unsigned():
    result = PushResult("m", "127.0.0.1:5000", "127.0.0.1:5000/envmgr/m:abc", "sha256:" + "d" * 64, IMAGE,
                        "abc", "lockhash", pushed="2026-01-01T00:00:00+00:00")
    assert "signed_by" not in result.fields()
    assert result.fields()["reference"] == "127.0.0.1:5000/envmgr/m:abc" and result.fields()["lock_hash"] == "lockhash"
    result.signed_by = "ab12"
    assert result.fields()["signed_by"] == "ab12"
    assert list(result.fields()) == ["method", "registry", "reference", "digest", "image_id", "inputs_hash",
                                     "lock_hash", "pushed", "signed_by", "layers_pushed", "layers_existing",
                                     "bytes_read"]


def test_pull_fields_keep_a_missing_digest_as_null():
    signature = {"state": "trusted", "key_id": "ab12"}
    result = PullResult("m", "127.0.0.1:5000", "127.0.0.1:5000/envmgr/m:abc", "envmgr/m:abc", IMAGE, None, "abc",
                        "lockhash", signature)
    assert result.fields() == {"method": "m", "registry": "127.0.0.1:5000",
                               "reference": "127.0.0.1:5000/envmgr/m:abc", "tag": "envmgr/m:abc", "image_id": IMAGE,
                               "digest": None, "inputs_hash": "abc", "lock_hash": "lockhash", "signature": signature}
    result.fields()["signature"]["state"] = "changed"
    assert result.signature["state"] == "trusted"   # the event is a copy
