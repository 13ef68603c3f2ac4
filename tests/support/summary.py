"""The closing lines of `make test`: per stage what ran, what was skipped and why (from pytest's junit reports).

    python -m tests.support.summary .test-reports
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

STAGES = [("unit", "tests/unit"), ("method", "tests/method (trainer, in .venv-method)"),
          ("integration", "tests/integration (real engine)"),
          ("engine-restart", "tests/integration -m engine_restart (stops and restarts dockerd)"),
          ("installed", "tests/installed (the wheelhouse in a fresh venv, outside the checkout)")]
NOT_RUN = {"engine-restart": "not run: it stops and restarts this machine's dockerd; opt in with "
                             "ENVMGR_TEST_ENGINE_RESTART=1 (CI sets it)"}


def stage_lines(report: Path) -> list[str]:
    """`12 passed, 2 skipped, 0 failed in 30.1 s` and one line per distinct skip reason."""
    root = ET.parse(report).getroot()
    counts: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    seconds = sum(float(suite.get("time") or 0) for suite in root.iter("testsuite"))
    for case in root.iter("testcase"):
        skipped = case.find("skipped")
        if skipped is not None:
            counts["skipped"] += 1
            reasons[(skipped.get("message") or "no reason given").strip()] += 1
        elif case.find("failure") is not None or case.find("error") is not None:
            counts["failed"] += 1
        else:
            counts["passed"] += 1
    head = ", ".join(f"{counts[k]} {k}" for k in ("passed", "skipped", "failed") if counts[k] or k == "passed")
    lines = [f"{head} in {seconds:.1f} s"]
    lines += [f"    skipped {n}: {reason}" for reason, n in reasons.most_common()]
    return lines


def summary(folder: Path) -> str:
    out = ["", "make test: summary", "  lint: ruff, mypy and the import contracts passed"]
    for stage, what in STAGES:
        report = folder / f"{stage}.xml"
        lines = stage_lines(report) if report.is_file() else [NOT_RUN.get(stage, "not run")]
        out.append(f"  {stage}: {what}: {lines[0]}")
        out += lines[1:]
    out.append("  pytest's temp folders: removed after green runs (pyproject.toml tmp_path_retention_policy)")
    return "\n".join(out)


if __name__ == "__main__":
    print(summary(Path(sys.argv[1] if len(sys.argv) > 1 else ".test-reports")))
