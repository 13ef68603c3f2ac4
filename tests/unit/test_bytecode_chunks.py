"""How a unit's bytecode is cut into compiling processes (no engine): fixed runs, byte order, its files only."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from envmgr.build.layers import COMPILE_CHUNK_FILES, SPLIT_SCRIPT, bytecode_chunks, bytecode_sources, record_digest


def test_chunks_are_fixed_runs_in_byte_order_whatever_the_input_order():
    sources = [f"./pkg/m{i:04d}.py" for i in range(2 * COMPILE_CHUNK_FILES + 7)]
    chunks = bytecode_chunks(list(reversed(sources)))
    assert [len(c) for c in chunks] == [COMPILE_CHUNK_FILES, COMPILE_CHUNK_FILES, 7]
    assert [s for c in chunks for s in c] == sources
    assert bytecode_chunks(sources) == chunks


def test_byte_order_is_c_locale_order():
    # LC_ALL=C: upper case before lower case, "_" between them, a non-ASCII name last
    assert bytecode_chunks(["./b.py", "./_a.py", "./B.py", "./é.py", "./a.py"], size=10) == \
        [["./B.py", "./_a.py", "./a.py", "./b.py", "./é.py"]]


def test_sources_are_the_py_files_outside_pycache():
    rows = ["pkg/__init__.py", "pkg/__pycache__/x.py", "pkg/data.json", "pkg/sub/m.py", "../../bin/tool.py",
            "pkg/weird\nname.py", "top.py", "pkg/__init__.py"]
    assert bytecode_sources(rows) == ["./pkg/__init__.py", "./pkg/sub/m.py", "./top.py"]


def _dist(site: Path, name: str, files: dict[str, str]) -> None:
    info = site / f"{name}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    for rel, text in files.items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text(text)
    rows = [f"{rel},{record_digest((site / rel).read_bytes())}," for rel in [*files, f"{info.name}/METADATA"]]
    (info / "RECORD").write_text("".join(f"{row}\n" for row in [*rows, f"{info.name}/RECORD,,"]))


def test_split_writes_each_units_compile_plan_from_its_record(tmp_path):
    prefix, envs = tmp_path / "prefix", tmp_path / "envs"
    site = prefix / "lib" / "python3.11" / "site-packages"
    envs.mkdir()
    big = {f"big/m{i:04d}.py": "X = 1\n" for i in range(COMPILE_CHUNK_FILES + 3)}
    _dist(site, "big", {**big, "big/lib.so": "", "big/__pycache__/m.cpython-311.pyc": ""})
    _dist(site, "ns-one", {"ns/one.py": "ONE = 1\n"})
    _dist(site, "ns-two", {"ns/two.py": "TWO = 2\n"})
    (tmp_path / "units.txt").write_text("k-big big\nk-one ns-one\nk-two ns-two\n")
    (tmp_path / "skeleton").write_text("")
    plan = tmp_path / "bytecode" / "plan"
    plan.parent.mkdir()
    (tmp_path / "split.py").write_text(SPLIT_SCRIPT)
    subprocess.run([sys.executable, "-S", "-B", str(tmp_path / "split.py"), str(prefix), str(envs),
                    str(tmp_path / "units.txt"), str(tmp_path / "skeleton"), str(plan)], check=True)
    lines = [line.split() for line in plan.read_text().splitlines()]
    unit_site = {key: str(envs / f"d-{key}" / "lib" / "python3.11" / "site-packages") for key in ("k-big", "k-one",
                                                                                                   "k-two")}
    assert [(s, Path(listing).name) for s, listing in lines] == [
        (unit_site["k-big"], "k-big-0000.txt"), (unit_site["k-big"], "k-big-0001.txt"),
        (unit_site["k-one"], "k-one-0000.txt"), (unit_site["k-two"], "k-two-0000.txt")]
    listed = {Path(listing).name: Path(listing).read_text().splitlines() for _, listing in lines}
    assert listed["k-big-0000.txt"] == sorted(f"./{rel}" for rel in big)[:COMPILE_CHUNK_FILES]
    assert listed["k-big-0001.txt"] == sorted(f"./{rel}" for rel in big)[COMPILE_CHUNK_FILES:]
    assert listed["k-one-0000.txt"] == ["./ns/one.py"] and listed["k-two-0000.txt"] == ["./ns/two.py"]
    assert all((Path(unit_site["k-big"]) / rel).is_file() for rel in listed["k-big-0001.txt"])
