"""System libraries found at build: DT_NEEDED read from real ELF files (built here by gcc), the sonames
nothing provides, the Debian package from a Contents index (served on 127.0.0.1) or the built-in list,
and the run-time hint for `cannot open shared object file`."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from envmgr.build.elf_needed import dynamic_info, missing
from envmgr.build.sonames import apt_line, fetch_index, reduce_contents, report, runtime_hint
from envmgr.runs.run import _failure
from tests.support.apt_contents import ContentsMirror

SITE = "lib/python3.11/site-packages"


def _gcc(*args: str, cwd: Path) -> None:
    subprocess.run(["gcc", "-shared", "-fPIC", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def env(tmp_path: Path) -> Path:
    """A prefix whose extension module needs libenvmgrmissing.so.1 and libcuda.so.1 (the driver's), and
    libbundled.so.1, which its wheel bundles in `pkg.libs/` (found by RUNPATH $ORIGIN)."""
    if shutil.which("gcc") is None:
        pytest.skip("needs gcc to build tiny ELF files")
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    (stubs / "stub.c").write_text("int stub(void) { return 1; }\n")
    for soname in ("libenvmgrmissing.so.1", "libbundled.so.1", "libcuda.so.1"):
        _gcc("-o", soname, f"-Wl,-soname,{soname}", "stub.c", cwd=stubs)
    prefix = tmp_path / "env"
    pkg = prefix / SITE / "pkg"
    pkg.mkdir(parents=True)
    (pkg.parent / "pkg.libs").mkdir()
    shutil.copy(stubs / "libbundled.so.1", pkg.parent / "pkg.libs" / "libbundled-1a2b3c.so.1")
    (stubs / "ext.c").write_text("int stub(void); int f(void) { return stub(); }\n")
    _gcc("-o", str(pkg / "_ext.cpython-311-x86_64-linux-gnu.so"), "ext.c", "-Wl,--no-as-needed", f"-L{stubs}",
         "-l:libenvmgrmissing.so.1", "-l:libbundled.so.1", "-l:libcuda.so.1", "-Wl,-rpath,$ORIGIN/../pkg.libs",
         cwd=stubs)
    return prefix


def test_dt_needed_soname_and_runpath_are_read(env):
    needed, soname, search = dynamic_info(str(env / SITE / "pkg" / "_ext.cpython-311-x86_64-linux-gnu.so"))
    assert needed[:3] == ["libenvmgrmissing.so.1", "libbundled.so.1", "libcuda.so.1"]
    assert soname is None and search == ["$ORIGIN/../pkg.libs"]
    assert dynamic_info(str(env / SITE / "pkg.libs" / "libbundled-1a2b3c.so.1"))[1] == "libbundled.so.1"
    (env / "not-elf.so").write_text("text")
    assert dynamic_info(str(env / "not-elf.so")) is None


def test_only_what_nothing_provides_is_missing(env, tmp_path):
    system = tmp_path / "usr-lib"
    system.mkdir()
    (system / "libc.so.6").write_text("")
    needed, optional = missing(str(env), [str(system)])
    assert needed == {"libenvmgrmissing.so.1": [f"{SITE}/pkg/_ext.cpython-311-x86_64-linux-gnu.so"]}, \
        "bundled (by SONAME), system and driver libraries are not missing"
    assert optional == {}
    (system / "libenvmgrmissing.so.1").write_text("")      # the system layer brought it
    assert missing(str(env), [str(system)]) == ({}, {})


def test_what_an_extension_loads_through_a_bundled_library_counts_a_plugins_needs_do_not(env, tmp_path):
    stubs = tmp_path / "stubs"
    (stubs / "plugin.c").write_text("int stub(void); int p(void) { return stub(); }\n")
    libs = env / SITE / "pkg.libs"
    _gcc("-o", str(libs / "libbundled-1a2b3c.so.1"), "-Wl,-soname,libbundled.so.1", "plugin.c", "-Wl,--no-as-needed",
         f"-L{stubs}", "-l:libenvmgrmissing.so.1", cwd=stubs)          # now the bundled library needs it
    _gcc("-o", str(env / SITE / "pkg" / "libtransport_rdma.so.1"), "plugin.c", "-Wl,--no-as-needed", f"-L{stubs}",
         "-l:libcuda.so.1", cwd=stubs)
    (stubs / "libibverbs.c").write_text("int stub(void) { return 2; }\n")
    _gcc("-o", "libibverbs.so.1", "-Wl,-soname,libibverbs.so.1", "libibverbs.c", cwd=stubs)
    _gcc("-o", str(env / SITE / "pkg" / "libtransport_ib.so.3"), "plugin.c", "-Wl,--no-as-needed", f"-L{stubs}",
         "-l:libibverbs.so.1", "-l:libenvmgrmissing.so.1", cwd=stubs)   # a plugin nothing links
    system = tmp_path / "usr-lib"
    system.mkdir()
    (system / "libc.so.6").write_text("")
    needed, optional = missing(str(env), [str(system)])
    assert needed == {"libenvmgrmissing.so.1": [f"{SITE}/pkg.libs/libbundled-1a2b3c.so.1",
                                                f"{SITE}/pkg/_ext.cpython-311-x86_64-linux-gnu.so"]}
    assert optional == {"libibverbs.so.1": [f"{SITE}/pkg/libtransport_ib.so.3"]}, \
        "what only a plugin needs is optional, and only once nothing an extension loads needs it"


CONTENTS = """\
usr/lib/x86_64-linux-gnu/libGL.so.1                     libs/libgl1
usr/lib/x86_64-linux-gnu/libGL.so.1.7.0                 libs/libgl1
usr/lib/x86_64-linux-gnu/libenvmgrmissing.so.1          libs/libenvmgr-missing1,oldlibs/libenvmgr-missing0
usr/share/doc/libenvmgrmissing.so.1                     doc/not-a-library
lib/x86_64-linux-gnu/libglib-2.0.so.0                   libs/libglib2.0-0
usr/bin/python3                                         python/python3-minimal
"""


def test_a_contents_index_is_reduced_to_library_files():
    found = reduce_contents(CONTENTS.encode().splitlines(keepends=True))
    assert found == {"libGL.so.1": "libgl1", "libGL.so.1.7.0": "libgl1",
                     "libenvmgrmissing.so.1": "libenvmgr-missing1", "libglib-2.0.so.0": "libglib2.0-0"}


def _ctx(tmp_path: Path, apt: str | None) -> SimpleNamespace:
    warnings: list[str] = []
    return SimpleNamespace(cache_dir=tmp_path / "cache", config=SimpleNamespace(mirrors=SimpleNamespace(
        apt=apt, http_proxy=None, https_proxy=None)), ui=SimpleNamespace(warn=warnings.append), warnings=warnings)


def test_the_apt_line_names_the_packages_from_the_mirrors_contents_index(tmp_path):
    mirror = ContentsMirror(gzip.compress(CONTENTS.encode()))
    try:
        ctx = _ctx(tmp_path, f"http://127.0.0.1:{mirror.port}/apt-mirror")
        lacking = {"libenvmgrmissing.so.1": ["a.so", "b.so"], "libGL.so.1": ["cv2/cv2.abi3.so"]}
        line = report(ctx, "cv", lacking, "bookworm", "x86_64", ["libyaml-0-2"])
        assert line == '[system] apt = ["libenvmgr-missing1", "libgl1", "libyaml-0-2"]'
        assert "libGL.so.1 (needed by cv2/cv2.abi3.so): Debian package libgl1" in ctx.warnings[0]
        assert "(+1 more)" in ctx.warnings[0] and "Contents index" in ctx.warnings[0]
        assert fetch_index(ctx, "bookworm", "x86_64") is not None and len(mirror.requests) == 1, "cached"
        assert not any("127.0.0.1" in str(p) for p in (tmp_path / "cache").rglob("*")), "no mirror in names"
    finally:
        mirror.stop()


def test_without_a_contents_index_the_built_in_list_answers(tmp_path):
    mirror = ContentsMirror(b"")
    try:
        ctx = _ctx(tmp_path, f"http://127.0.0.1:{mirror.port}/elsewhere")     # 404
        lacking = {"libGL.so.1": ["cv2.so"], "libgthread-2.0.so.0": ["cv2.so"], "libenvmgrmissing.so.1": ["x.so"]}
        line = report(ctx, "cv", lacking, "bookworm", "x86_64", [])
        assert line == apt_line(["libgl1", "libglib2.0-0"]) == '[system] apt = ["libgl1", "libglib2.0-0"]'
        assert "libenvmgrmissing.so.1 (needed by x.so): no package found" in ctx.warnings[0]
    finally:
        mirror.stop()
    assert report(_ctx(tmp_path, None), "cv", {}, "bookworm", "x86_64", []) is None


def test_a_run_that_cannot_open_a_library_names_its_package(tmp_path):
    tail = ["Traceback (most recent call last):", '  File "train.py", line 1, in <module>',
            "ImportError: libGL.so.1: cannot open shared object file: No such file or directory"]
    assert "libGL.so.1 is in Debian package libgl1" in (runtime_hint(tail, tmp_path) or "")
    error = _failure("20261206-070000-abcd", tmp_path, {"exit_code": 1}, tail, tmp_path)
    assert error.hint and '[system] apt = ["libgl1"]' in error.hint
    assert runtime_hint(["ModuleNotFoundError: No module named 'cv2'"], tmp_path) is None


# ---------------------------------------------------------------- the same answer from records (issue 26)

def _facts_of(env: Path) -> tuple[dict, set[str], set[str]]:
    """What the layer store keeps of this prefix: each file's path, and the ELF facts layers.elf_facts reads."""
    from envmgr.build.layers import elf_facts

    paths = {str(p.relative_to(env)) for p in env.rglob("*") if p.is_file() or p.is_symlink()}
    return elf_facts(env, sorted(paths)), paths, {p.rsplit("/", 1)[-1] for p in paths}


@pytest.mark.parametrize("system_has", [(), ("libenvmgrmissing.so.1",)])
def test_records_give_the_scans_answer(env, tmp_path, system_has):
    from envmgr.build.elf_needed import decide

    (env / SITE / "pkg" / "readme.so.txt").write_text("not an ELF file")
    system = tmp_path / "usr-lib"
    system.mkdir()
    for name in ("libc.so.6", *system_has):
        (system / name).write_text("")
    elf, paths, names = _facts_of(env)
    assert set(elf) == {f"{SITE}/pkg/_ext.cpython-311-x86_64-linux-gnu.so", f"{SITE}/pkg.libs/libbundled-1a2b3c.so.1"}
    root = str(env)
    from_records = decide(root, {k: tuple(v) for k, v in elf.items()}, names, {"libc.so.6", *system_has},
                          lambda path: os.path.normpath(path).removeprefix(root + "/") in paths)
    assert from_records == missing(root, [str(system)])


def test_image_files_follow_links_and_read_ld_so_conf(tmp_path):
    from envmgr.build.sonames import ImageFiles, _tar_index

    tar_path = tmp_path / "rootfs.tar"
    with tarfile.open(tar_path, "w") as tar:
        def add(name, data=b"", link=None, kind=tarfile.REGTYPE):
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE if link else kind
            info.linkname = link or ""
            info.size = len(data) if not link and kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(data) if info.size else None)
        add("./usr/lib/x86_64-linux-gnu", kind=tarfile.DIRTYPE)
        add("./usr/lib/x86_64-linux-gnu/libc.so.6")
        add("./usr/lib/x86_64-linux-gnu/libz.so.1", link="libz.so.1.2.13")
        add("./usr/lib/x86_64-linux-gnu/libz.so.1.2.13")
        add("./lib", link="usr/lib")
        add("./opt/vendor/lib/libvendor.so.2")
        add("./opt/other/libnot.so.1")
        add("./etc/ld.so.conf.d/vendor.conf", b"# vendor\n/opt/vendor/lib\n")
    ctx = SimpleNamespace(cache_dir=tmp_path / "cache")
    files = ImageFiles([_tar_index(ctx, tar_path)])
    assert files.resolve("/lib/x86_64-linux-gnu/libz.so.1") == "usr/lib/x86_64-linux-gnu/libz.so.1.2.13"
    assert files.exists("/lib/x86_64-linux-gnu/libc.so.6") and not files.exists("/lib/libc.so.6")
    assert {"libc.so.6", "libz.so.1", "libz.so.1.2.13", "libvendor.so.2"} <= files.library_names()
    assert "libnot.so.1" not in files.library_names()
    assert _tar_index(ctx, tar_path) == _tar_index(ctx, tar_path)      # kept: the second read is the memo


def test_the_image_reader_prints_each_records_elf_facts(env, tmp_path):
    """read_image_records' script, run here with this interpreter (in a build it runs in the image)."""
    import sys

    from envmgr.build import layer_facts

    dist_info = env / SITE / "pkg-1.0.dist-info"
    dist_info.mkdir()
    rows = ["pkg/_ext.cpython-311-x86_64-linux-gnu.so,sha256=x,1", "pkg.libs/libbundled-1a2b3c.so.1,sha256=y,2",
            "pkg/__init__.py,,", "pkg-1.0.dist-info/RECORD,,"]
    (dist_info / "RECORD").write_text("\n".join(rows) + "\n")
    (env / SITE / "pkg" / "__init__.py").write_text("")
    record = str(dist_info / "RECORD")

    class Engine:
        def run(self, spec, on_line):
            proc = subprocess.run([sys.executable, *spec.command[1:]], capture_output=True, text=True)
            for line in proc.stdout.splitlines():
                on_line(line)
            return SimpleNamespace(exit_code=proc.returncode)

    ctx = SimpleNamespace(engine=Engine(), ui=SimpleNamespace(log=lambda *_: None))
    records, elf = layer_facts.read_image_records(ctx, "sha256:x", sys.executable, [record, "/nowhere/RECORD"],
                                                  str(env / SITE), str(env), "m")
    assert records == {record: (dist_info / "RECORD").read_bytes()}
    expected, _paths, _names = _facts_of(env)
    assert elf[record] == {k: list(v) for k, v in expected.items()}
    assert elf["/nowhere/RECORD"] == {}
