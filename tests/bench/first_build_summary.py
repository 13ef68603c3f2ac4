"""Issue 26's figures side by side: what the benches of this `make bench` run measured, against each goal.

Reads what cold_build_bench, layer_facts_bench, slurm_bench and lock_bench wrote to bench-results/ (run them
first: `make bench` does, in one run) and prints one table: figure, measured, goal, met. A figure whose bench
did not run (or failed) is printed as missing, never guessed.
Run: `.venv/bin/python -m tests.bench.first_build_summary` (the last step of `make bench`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[2] / "bench-results"


def _read(name: str) -> dict | None:
    try:
        return json.loads((OUT / name).read_text())
    except (OSError, ValueError):
        return None


def rows() -> list[tuple[str, str, str, str]]:
    """(figure, measured, goal, met) for each of issue 26's goals."""
    found: list[tuple[str, str, str, str]] = []
    for method in ("sd-demo", "cold-bench"):
        cold = _read(f"cold_build-{method}.json")
        if cold is None:
            found.append((f"cold build {method} / docker build + uv", "missing", "<= 1.00x", "-"))
            continue
        envmgr, baseline = cold["envmgr"]["wall"], cold["baseline"]["wall"]
        found.append((f"cold build {method} / docker build + uv",
                      f"{envmgr:.1f} s / {baseline:.1f} s = {cold['ratio']:.2f}x "
                      f"(floor {cold['floor']['total_s']:.1f} s)", "<= 1.00x", _met(cold["ratio"] <= 1.0)))
    facts = _read("layer_facts.json")
    if facts is None:
        found += [("one pin in a second base dir", "missing", "<= 10 s", "-"), ("cold-cache sbom", "missing",
                                                                                "<= 10 s", "-")]
    else:
        one_pin = float(facts["second_base_dir_build_s"])
        found.append(("one pin in a second base dir", f"{one_pin:.1f} s (installed "
                      f"{', '.join(facts['second_base_dir_installed'])}; {facts['second_base_dir_learned']} "
                      "learned from the engine)", "<= 10 s", _met(one_pin <= 10)))
        sbom = float(facts["cold_sbom_s"])
        found.append(("cold-cache sbom", f"{sbom:.1f} s (read layer bytes: {facts['cold_sbom_read_layers']})",
                      "<= 10 s", _met(sbom <= 10 and facts["cold_sbom_read_layers"] == "False")))
    slurm = _read("slurm.json")
    if slurm is None:
        found.append(("Slurm over local, to container start", "missing", "<= +2 s", "-"))
    else:
        for setting, result in slurm.items():
            if isinstance(result, dict) and "slurm_extra_s_median" in result:
                found.append((f"Slurm over local ({setting})", f"+{result['slurm_extra_s_median']:.2f} s "
                              f"({result['scheduler_parameters']})", "<= +2 s",
                              _met(result["slurm_extra_s_median"] <= 2)))
    lock = _read("lock.json")
    if lock is None:
        found.append(("one-pin lock / host poetry lock (warm)", "missing", "<= 1.00x", "-"))
    else:
        found.append(("one-pin lock / host poetry lock (warm)",
                      f"{lock['warm_envmgr_lock_s']:.1f} s / {lock['warm_host_poetry_lock_s']:.1f} s = "
                      f"{lock['warm_ratio']:.2f}x", "<= 1.00x", _met(bool(lock["met"]))))
    return found


def _met(ok: bool) -> str:
    return "yes" if ok else "no"


def main() -> int:
    table = rows()
    width = max(len(row[0]) for row in table)
    value = max(len(row[1]) for row in table)
    print(f"{'issue 26':<{width}}  {'measured':<{value}}  {'goal':<9}  met")
    for figure, measured, goal, met in table:
        print(f"{figure:<{width}}  {measured:<{value}}  {goal:<9}  {met}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
