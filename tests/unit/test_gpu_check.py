"""The GPU decision table with real driver/CUDA pairs, architectures and memory (no GPU needed)."""

import pytest

from envmgr.core import paths
from envmgr.core.gpu import (
    HostGpu,
    HostGpuFacts,
    ImageGpuFacts,
    arch_support,
    check,
    driver_runs,
    facts_from_pins,
    parse_gpus,
)

# torch 2.13.0's CUDA 13.0 wheels and torch 2.10.0's CUDA 12.8 wheels, as their builds report them
CU130 = ImageGpuFacts(torch="2.13.0", cuda="13.0", cudnn="9.20.0.48",
                      archs=("sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120", "compute_120"))
CU128 = ImageGpuFacts(torch="2.10.0", cuda="12.8", cudnn="9.10.2.21",
                      archs=("sm_70", "sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"))
A100 = HostGpu(0, "NVIDIA A100-SXM4-80GB", (8, 0), 85_899_345_920)
L4 = HostGpu(1, "NVIDIA L4", (8, 9), 24_152_899_584)
V100 = HostGpu(0, "Tesla V100-SXM2-32GB", (7, 0), 34_359_738_368)
RTX5090 = HostGpu(0, "NVIDIA GeForce RTX 5090", (12, 0), 34_190_917_632)
H100 = HostGpu(0, "NVIDIA H100 80GB HBM3", (9, 0), 85_520_809_984)


def host(driver: str, cuda: str, *gpus: HostGpu) -> HostGpuFacts:
    return HostGpuFacts(driver=driver, cuda=cuda, gpus=tuple(gpus))


@pytest.mark.parametrize("driver, cuda, runs", [
    ("535.183.01", "13.0", False), ("550.127.05", "13.0", False), ("570.86.10", "13.0", False),
    ("580.65.06", "13.0", True), ("580.95.05", "13.0", True),
    ("470.256.02", "12.8", False), ("525.60.13", "12.8", True), ("535.183.01", "12.8", True),
    ("550.127.05", "12.8", True), ("570.86.10", "12.8", True), ("580.65.06", "12.8", True),
])
def test_driver_against_cuda_per_nvidia_table(driver, cuda, runs):
    assert driver_runs(driver, cuda) is runs


@pytest.mark.parametrize("driver", ["535.183.01", "550.127.05", "570.86.10"])
def test_cuda13_image_refused_on_older_driver_with_the_driver_it_needs(driver):
    result = check(parse_gpus("all"), CU130, host(driver, "12.8", A100))
    assert not result.ok
    assert "driver ≥ 580 (CUDA 13.0)" in result.problem and driver in result.problem
    assert "upgrade the driver" in result.problem and "\n" not in result.problem


def test_cuda12_image_on_minor_version_driver_runs_with_a_note():
    result = check(parse_gpus("all"), CU128, host("535.183.01", "12.2", A100))
    assert result.ok and result.gpus == (A100,)
    assert any("minor-version compatibility" in note for note in result.notes)


def test_match_lists_the_gpus_it_will_use():
    result = check(parse_gpus("all"), CU130, host("580.65.06", "13.0", A100, A100.__class__(1, A100.name, (8, 0),
                                                                                                A100.memory_bytes)))
    assert result.ok and [g.index for g in result.gpus] == [0, 1] and not result.notes


@pytest.mark.parametrize("capability, archs, expected", [
    ((8, 0), CU130.archs, "sass"),
    ((8, 9), CU130.archs, "sass"),       # sm_86 cubins run on sm_89 (same major, later minor)
    ((9, 0), CU130.archs, "sass"),
    ((12, 0), CU130.archs, "sass"),
    ((7, 0), CU130.archs, None),         # torch 2.13 dropped Volta
    ((7, 0), CU128.archs, "sass"),
    ((12, 1), ("sm_80", "sm_90", "compute_90"), "ptx"),
    ((12, 0), ("sm_80", "sm_90"), None),
    ((9, 0), ("sm_90a",), "sass"),
    ((10, 0), ("sm_90a",), None),        # arch-specific cubins are for that GPU only
])
def test_architecture_support(capability, archs, expected):
    assert arch_support(capability, archs) == expected


def test_gpu_older_than_the_build_is_refused_with_a_variant_fix():
    result = check(parse_gpus("all"), CU130, host("580.65.06", "13.0", V100))
    assert not result.ok and "sm_70" in result.problem and "sm_75–sm_120" in result.problem
    assert "older torch" in result.problem


def test_gpu_newer_than_the_build_is_refused():
    old_build = ImageGpuFacts(torch="2.6.0", cuda="12.4", archs=("sm_50", "sm_60", "sm_70", "sm_80", "sm_90"))
    result = check(parse_gpus("all"), old_build, host("570.86.10", "12.8", RTX5090))
    assert not result.ok and "sm_120" in result.problem and "newer torch" in result.problem


def test_ptx_only_gpu_needs_the_toolkits_own_driver():
    ptx_build = ImageGpuFacts(torch="2.10.0", cuda="12.8", archs=("sm_80", "sm_90", "compute_90"))
    refused = check(parse_gpus("all"), ptx_build, host("550.127.05", "12.4", RTX5090))
    assert not refused.ok and "PTX" in refused.problem and "570.26" in refused.problem
    allowed = check(parse_gpus("all"), ptx_build, host("570.86.10", "12.8", RTX5090))
    assert allowed.ok and any("PTX" in note for note in allowed.notes)


def test_unknown_archs_are_not_guessed():
    result = check(parse_gpus("all"), ImageGpuFacts(torch="2.13.0", cuda="13.0"), host("580.65.06", "13.0", V100))
    assert result.ok and any("unknown" in note for note in result.notes)


def test_too_little_memory_names_a_larger_gpu():
    result = check(parse_gpus("all"), CU130, host("580.65.06", "13.0", A100, L4), memory_gb=40)
    assert not result.ok
    assert "mixes GPU models" in result.problem          # mixed models come first
    result = check(parse_gpus("1,"), CU130, host("580.65.06", "13.0", A100, L4), memory_gb=40)
    assert not result.ok and "24.2 GB" in result.problem and "40 GB" in result.problem
    assert "--gpus 0" in result.problem
    assert check(parse_gpus("0,"), CU130, host("580.65.06", "13.0", A100, L4), memory_gb=40).ok


def test_24gb_card_meets_a_24gb_minimum():
    assert check(parse_gpus("all"), CU130, host("580.65.06", "13.0", L4), memory_gb=24).ok


def test_more_gpus_than_the_host_has():
    two = host("580.65.06", "13.0", A100, HostGpu(1, A100.name, (8, 0), A100.memory_bytes))
    result = check(parse_gpus("3"), CU130, two)
    assert not result.ok and "asks for 3 GPUs but this host has 2" in result.problem and "--gpus 0,1" in result.problem
    result = check(parse_gpus("0,7"), CU130, two)
    assert not result.ok and "no GPU 7" in result.problem
    assert [g.index for g in check(parse_gpus("1"), CU130, two).gpus] == [0]


def test_mixed_models_are_refused_with_a_same_model_choice():
    result = check(parse_gpus("all"), CU130, host("580.65.06", "13.0", H100, HostGpu(1, "NVIDIA L4", (8, 9), 24e9)))
    assert not result.ok and "mixes GPU models" in result.problem and "--gpus 0," in result.problem
    assert parse_gpus("0,").indices == (0,)      # the suggested flag parses as that one GPU


@pytest.mark.parametrize("facts", [
    HostGpuFacts(problem="NVML is not usable on this host (NVML Shared Library Not Found)"),
    HostGpuFacts(problem="NVML failed while reading the GPUs (Unknown Error)"),
])
def test_unreadable_host_is_an_error_for_gpu_runs_only(facts):
    result = check(parse_gpus("all"), CU130, facts)
    assert not result.ok and "NVML" in result.problem and "--gpus none" in result.problem
    assert check(parse_gpus("none"), CU130, facts).ok


def test_host_without_gpus():
    result = check(parse_gpus("all"), CU130, host("580.65.06", "13.0"))
    assert not result.ok and "no GPU" in result.problem


def test_image_without_cuda_checks_only_the_host():
    assert check(parse_gpus("all"), ImageGpuFacts(), host("470.256.02", "11.4", V100)).ok


@pytest.mark.parametrize("pins, virtual, expected", [
    ({"torch": "2.13.0", "nvidia-cuda-runtime": "13.0.96", "nvidia-cudnn-cu13": "9.20.0.48"}, None,
     ImageGpuFacts(torch="2.13.0", cuda="13.0", cudnn="9.20.0.48")),
    ({"torch": "2.10.0", "nvidia-cuda-runtime-cu12": "12.8.90", "nvidia-cudnn-cu12": "9.10.2.21"}, None,
     ImageGpuFacts(torch="2.10.0", cuda="12.8", cudnn="9.10.2.21")),
    ({"torch": "2.10.0+cu126"}, None, ImageGpuFacts(torch="2.10.0", cuda="12.6")),
    ({"torch": "2.13.0+cpu"}, None, ImageGpuFacts(torch="2.13.0")),
    ({"pytorch": "2.5.1", "cuda-version": "12.4", "cudnn": "9.3.0.75"}, None,
     ImageGpuFacts(torch="2.5.1", cuda="12.4", cudnn="9.3.0.75")),
    ({"python": "3.11.9", "numpy": "2.1.0"}, {"__cuda": "12.2"}, ImageGpuFacts(cuda="12.2")),
    ({"requests": "2.32.3"}, None, ImageGpuFacts()),
])
def test_facts_from_lock_pins(pins, virtual, expected):
    assert facts_from_pins(pins, virtual) == expected


def test_labels_round_trip_and_describe():
    labels = CU130.to_labels()
    assert labels[paths.LABEL_CUDA] == "13.0" and labels[paths.LABEL_TORCH] == "2.13.0"
    assert ImageGpuFacts.from_labels(labels) == CU130
    assert CU130.describe() == "needs NVIDIA driver ≥ 580 (CUDA 13.0); GPUs sm_75–sm_120"
    assert ImageGpuFacts().to_labels() == {}
