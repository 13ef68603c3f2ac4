"""torch's GPU architectures read from its library's bytes (gpu_image.archs_from_files), running nothing of
it; whatever the bytes do not say for sure is left to the boxed import (None)."""

import os
from pathlib import Path

import pytest

from envmgr.build.gpu_image import archs_from_files, archs_in_library

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
