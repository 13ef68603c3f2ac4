"""Verb results as values: what verify and doctor report, decided outside the CLI."""

from __future__ import annotations

from envmgr.doctor import Check, exit_code
from envmgr.errors import Exit
from envmgr.verify import VerifyResult


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
