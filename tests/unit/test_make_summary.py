"""The closing summary of `make test`: what ran, what was skipped and why, per stage."""

from __future__ import annotations

from tests.support.summary import summary

REPORT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0" failures="0"
skipped="3" tests="5" time="12.5"><testcase classname="a" name="t1" time="1"/><testcase classname="a" name="t2"
time="1"/><testcase classname="a" name="t3" time="0"><skipped type="pytest.skip" message="needs a GPU">x</skipped>
</testcase><testcase classname="a" name="t4" time="0"><skipped type="pytest.skip" message="needs a GPU">x</skipped>
</testcase><testcase classname="a" name="t5" time="0"><skipped type="pytest.skip"
message="stops and restarts this machine's dockerd: opt in with ENVMGR_TEST_ENGINE_RESTART=1">x</skipped>
</testcase></testsuite></testsuites>"""


def test_summary_names_counts_skip_reasons_and_stages_not_run(tmp_path):
    (tmp_path / "integration.xml").write_text(REPORT)
    text = summary(tmp_path)
    assert "integration: tests/integration (real engine): 2 passed, 3 skipped in 12.5 s" in text
    assert "    skipped 2: needs a GPU" in text
    assert "    skipped 1: stops and restarts this machine's dockerd: opt in with ENVMGR_TEST_ENGINE_RESTART=1" in text
    assert "unit: tests/unit: not run" in text
    assert "engine-restart: tests/integration -m engine_restart (stops and restarts dockerd): not run: " \
           "it stops and restarts this machine's dockerd; opt in with ENVMGR_TEST_ENGINE_RESTART=1" in text
