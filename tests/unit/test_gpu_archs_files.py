"""torch's GPU architectures read from its library's bytes (gpu_image.archs_from_files), running nothing of
it; whatever the bytes do not say for sure is left to the boxed import (None)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from envmgr.build.gpu_image import FILES_MARK, FILES_SCRIPT, archs_from_files, archs_in_library

NAMES = b"\0_cuda_getArchFlags\0_cuda_getDeviceCount\0"
# as in torch 2.13.0+cu130's libtorch_python.so: the flags beside other strings naming architectures
CUDA = (b"\x7fELF\0\0expected sm_80 or newer, got %s\0sm_\0compute_capability\0"
        b"sm_75 sm_80 sm_86 sm_90 sm_100 sm_120\0cudaErrorX\0" + NAMES + b"tail")


def test_a_cuda_librarys_single_flags_string_is_the_arch_list_sorted_as_the_import_reports_it():
    assert archs_in_library(CUDA, gpu_libs=True) == ["sm_100", "sm_120", "sm_75", "sm_80", "sm_86", "sm_90"]


def test_flags_glued_to_a_character_array_without_its_nul_are_found():
    """torch 2.8.0+cu128: the literal follows a char array that has no terminating NUL."""
    data = b"\0\0from_ipc_handle(Device device, std::string ipc_hsm_70 sm_75 sm_80\0\0" + NAMES
    assert archs_in_library(data, gpu_libs=True) == ["sm_70", "sm_75", "sm_80"]


def test_ptx_and_arch_specific_tokens_are_kept():
    data = b"\0sm_90a sm_100 compute_120\0" + NAMES
    assert archs_in_library(data, gpu_libs=True) == ["compute_120", "sm_100", "sm_90a"]


@pytest.mark.parametrize("data", [
    CUDA.replace(b"cudaErrorX", b"sm_50 sm_60"),                  # two candidates: which is it?
    CUDA.replace(b"_cuda_getArchFlags", b"_cuda_getArchFlagz"),   # no method that returns it
    b"\0-arch sm_75 sm_80\0" + NAMES,                             # words of a sentence
    b"\0--gpu-architecture=sm_75\0" + NAMES,
    b"\0gfx90a gfx942\0" + NAMES,                                 # ROCm's arch names: the import says
    b"sm_75 sm_80\0" + NAMES,                                     # no string start before it
])
def test_what_the_bytes_do_not_say_for_sure_is_left_to_the_import(data):
    assert archs_in_library(data, gpu_libs=True) is None


def test_a_cpu_build_has_no_architectures_without_importing():
    assert archs_in_library(b"\0torch_python\0sm_ is a prefix\0", gpu_libs=False) == []
    # a GPU library beside it, or torch._C's CUDA methods without flags: not a CPU build the bytes can vouch for
    assert archs_in_library(b"\0torch_python\0", gpu_libs=True) is None
    assert archs_in_library(b"\0torch_python" + NAMES, gpu_libs=False) is None


def _torch_lib(prefix: Path, python: str = "python3.11") -> Path:
    lib = prefix / "lib" / python / "site-packages" / "torch" / "lib"
    lib.mkdir(parents=True)
    return lib


def test_archs_are_read_from_the_installed_prefix(tmp_path):
    lib = _torch_lib(tmp_path / "prefix")
    (lib / "libtorch_python.so").write_bytes(CUDA)
    (lib / "libtorch_cuda.so").write_bytes(b"\0")
    assert archs_from_files(tmp_path / "prefix") == ["sm_100", "sm_120", "sm_75", "sm_80", "sm_86", "sm_90"]


def test_a_cpu_torch_in_the_prefix_has_none(tmp_path):
    lib = _torch_lib(tmp_path / "prefix")
    (lib / "libtorch_python.so").write_bytes(b"\0torch_python\0")
    (lib / "libtorch_cpu.so").write_bytes(b"\0")
    assert archs_from_files(tmp_path / "prefix") == []
    (lib / "libc10_cuda.so").write_bytes(b"\0")
    assert archs_from_files(tmp_path / "prefix") is None


def test_no_torch_library_or_two_of_them_is_for_the_import(tmp_path):
    prefix = tmp_path / "prefix"
    (prefix / "lib" / "python3.11" / "site-packages" / "torch").mkdir(parents=True)   # a pure-Python torch
    assert archs_from_files(prefix) is None
    for python in ("python3.11", "python3.12"):
        lib = prefix / "lib" / python / "site-packages" / "torch" / "lib"
        lib.mkdir(parents=True, exist_ok=True)
        (lib / "libtorch_python.so").write_bytes(CUDA)
    assert archs_from_files(prefix) is None
    (prefix / "lib" / "python3.12" / "site-packages" / "torch" / "lib" / "libtorch_python.so").write_bytes(b"")
    (prefix / "lib" / "python3.11" / "site-packages" / "torch" / "lib" / "libtorch_python.so").unlink()
    assert archs_from_files(prefix) is None   # an empty file


def test_links_out_of_the_prefix_are_not_followed(tmp_path):
    """Package files are read on the host: a link (to a file, or a folder outside the prefix) is not read."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "libtorch_python.so").write_bytes(CUDA)
    lib = _torch_lib(tmp_path / "prefix")
    (lib / "libtorch_python.so").symlink_to(outside / "libtorch_python.so")
    assert archs_from_files(tmp_path / "prefix") is None

    other = tmp_path / "other"
    torch = other / "lib" / "python3.11" / "site-packages" / "torch"
    torch.mkdir(parents=True)
    (torch / "lib").symlink_to(outside)
    assert archs_from_files(other) is None


def test_a_fifo_is_not_waited_on(tmp_path):
    lib = _torch_lib(tmp_path / "prefix")
    os.mkfifo(lib / "libtorch_python.so")
    assert archs_from_files(tmp_path / "prefix") is None


def _script(tmp_path: Path, prefix: Path) -> subprocess.CompletedProcess:
    script = tmp_path / "archs.py"
    script.write_text(FILES_SCRIPT)
    return subprocess.run([sys.executable, "-S", "-I", "-B", str(script), str(prefix)], capture_output=True, text=True)


def test_the_steps_script_prints_the_archs_or_exits_1_for_the_import(tmp_path):
    """FILES_SCRIPT: archs_from_files run by the base's Python in the install step, standard library only."""
    lib = _torch_lib(tmp_path / "prefix")
    (lib / "libtorch_python.so").write_bytes(CUDA)
    done = _script(tmp_path, tmp_path / "prefix")
    assert done.returncode == 0, done.stderr
    assert done.stdout == FILES_MARK + '["sm_100", "sm_120", "sm_75", "sm_80", "sm_86", "sm_90"]\n'
    (lib / "libtorch_python.so").write_bytes(b"\0torch_python" + NAMES)   # what the bytes cannot vouch for
    done = _script(tmp_path, tmp_path / "prefix")
    assert (done.returncode, done.stdout) == (1, "")
    done = _script(tmp_path, tmp_path / "nothing-here")
    assert (done.returncode, done.stdout) == (1, "")


def _stage(tmp_path: Path, said: list[str], monkeypatch) -> tuple[list[str] | None, list[str], list[str]]:
    """stage_units with read_archs and a fake step runner whose install step prints `said`: (archs, the steps
    run, the boxed reads)."""
    from envmgr.build import gpu_image
    from envmgr.build.layers import Unit, stage_units
    from tests.support.stage import stage_setup

    steps: list[str] = []
    boxed: list[str] = []

    def runner(ctx, step, on_line=None):
        steps.append(step.script)
        for line in (said if len(steps) == 1 else ["ENVMGR-PHASE split"]):
            on_line(line)
        return []

    def read_archs_boxed(ctx, method, base, prefix, container_prefix):
        boxed.append(str(prefix))
        return ["sm_80"]

    monkeypatch.setattr(gpu_image, "read_archs_boxed", read_archs_boxed)
    ctx, base, stage = stage_setup(tmp_path, runner)
    archs = stage_units(ctx, base, "m", [Unit("torch", "torch==2.13.0 --hash=sha256:00", "k-torch")], stage, [],
                        want_skeleton=False, read_archs=True)
    return archs, steps, boxed


def test_archs_the_install_step_read_need_no_import_and_no_second_step(tmp_path, monkeypatch):
    said = ["+ torch==2.13.0", "ENVMGR-PHASE installed", FILES_MARK + '["sm_75", "sm_90"]', "ENVMGR-PHASE gpu-facts",
            "ENVMGR-PHASE split", "ENVMGR-PHASE compiled"]
    archs, steps, boxed = _stage(tmp_path, said, monkeypatch)
    assert archs == ["sm_75", "sm_90"] and boxed == []
    assert len(steps) == 1
    script = steps[0]   # install, then the read, then the split: one container
    assert script.index("pip install") < script.index("archs.py") < script.index("split.py")


def test_when_the_step_cannot_tell_torch_is_imported_boxed_before_the_split_step(tmp_path, monkeypatch):
    # a line that looks like the read's but comes before the install ends (uv's output) is not the read's
    said = [FILES_MARK + '["sm_99"]', "+ torch==2.13.0", "ENVMGR-PHASE installed", "ENVMGR-PHASE gpu-facts-need-import"]
    archs, steps, boxed = _stage(tmp_path, said, monkeypatch)
    assert archs == ["sm_80"] and len(boxed) == 1 and boxed[0].endswith("/.shared")
    assert len(steps) == 2 and "pip install" not in steps[1] and "split.py" in steps[1]
