"""Variant choice and the host check before a run, with injected host facts (no GPU, no engine)."""

import shutil
from types import SimpleNamespace

import pytest

from envmgr.core import paths
from envmgr.core.errors import StaleLockError, UsageError
from envmgr.core.gpu import HostGpu, HostGpuFacts
from envmgr.core.spec import find_method, load_spec
from envmgr.core.variants import variant_spec
from envmgr.runs.gpu_host import parse_probe, read, read_nvml
from envmgr.runs.gpu_plan import preflight

A100 = HostGpu(0, "NVIDIA A100-SXM4-80GB", (8, 0), 85_899_345_920)
A100_B = HostGpu(1, "NVIDIA A100-SXM4-80GB", (8, 0), 85_899_345_920)


class NoEngine:
    """A context whose engine knows no images (no variant built yet)."""

    def __init__(self):
        self.steps = []
        self.engine = SimpleNamespace(inspect_image=lambda ref: None)
        self.ui = SimpleNamespace(step=lambda message, **_: self.steps.append(message), info=lambda message: None)


@pytest.fixture
def sd_demo():
    return find_method("sd-demo", None)


def host(driver, cuda, *gpus):
    return HostGpuFacts(driver=driver, cuda=cuda, gpus=gpus)


def test_new_driver_runs_the_default(sd_demo):
    plan = preflight(NoEngine(), sd_demo, "all", host=host("580.65.06", "13.0", A100, A100_B))
    assert plan.spec.variant is None and "newest this host can use" in plan.why
    assert plan.env() == {paths.ENV_GPUS: "all", "TRAINING_NUM_PROCESSES": "2"}


@pytest.mark.parametrize("driver", ["535.183.01", "550.127.05", "570.86.10"])
def test_older_driver_takes_the_cuda128_variant_and_says_why(sd_demo, driver):
    plan = preflight(NoEngine(), sd_demo, "all", host=host(driver, "12.8", A100))
    assert plan.spec.variant == "cu128"
    assert plan.spec.image_repository == "envmgr/sd-demo-cu128"
    assert "default needs NVIDIA driver ≥ 580" in plan.why and driver in plan.why


def test_too_old_for_every_variant_names_the_least_it_needs(sd_demo):
    with pytest.raises(UsageError) as err:
        preflight(NoEngine(), sd_demo, "all", host=host("470.256.02", "11.4", A100))
    assert "variant cu128" in str(err.value) and "driver ≥ 525 (CUDA 12.8)" in str(err.value)


def test_asked_for_variant_that_cannot_run_points_to_one_that_can(sd_demo):
    with pytest.raises(UsageError) as err:
        preflight(NoEngine(), sd_demo, "all", "default", host=host("570.86.10", "12.8", A100))
    assert "≥ 580" in str(err.value) and "--variant cu128" in str(err.value)
    assert preflight(NoEngine(), sd_demo, "all", "cu128", host=host("580.65.06", "13.0", A100)).spec.variant == "cu128"


def test_cpu_runs_the_default_without_reading_host_gpus(sd_demo):
    ctx = NoEngine()
    ctx.engine = None   # any host or engine query would fail
    plan = preflight(ctx, sd_demo, "none")
    assert plan.spec.variant is None and "CPU" in plan.why
    assert plan.env() == {paths.ENV_GPUS: "none"}


def test_bad_gpu_requests_fail_before_anything(sd_demo):
    two = host("580.65.06", "13.0", A100, A100_B)
    for gpus, says in [("3", "asks for 3 GPUs but this host has 2"), ("0,7", "no GPU 7"), ("0", "--gpus none")]:
        with pytest.raises(UsageError) as err:
            preflight(NoEngine(), sd_demo, gpus, host=two)
        assert says in str(err.value)
    with pytest.raises(UsageError, match="NVML"):
        preflight(NoEngine(), sd_demo, "all", host=HostGpuFacts(problem="NVML is not usable on this host (x)"))


def test_unknown_variant_lists_the_known_ones(sd_demo):
    with pytest.raises(UsageError) as err:
        preflight(NoEngine(), sd_demo, "all", "cu118", host=host("580.65.06", "13.0", A100))
    assert "no variant 'cu118'" in str(err.value) and "default, cu128" in str(err.value)


def test_stale_variant_lock_names_the_variant_lock_command(sd_demo, tmp_path):
    folder = tmp_path / "sd-demo"
    folder.mkdir()
    for name in ("pyproject.toml", "poetry.lock"):
        shutil.copy(sd_demo.folder / name, folder / name)
    shutil.copytree(sd_demo.folder / "variants", folder / "variants")
    (folder / "envmgr.toml").write_text((sd_demo.folder / "envmgr.toml").read_text()
                                        .replace('torch = "2.10.0"', 'torch = "2.9.1"'))
    spec = load_spec(folder / "envmgr.toml")
    with pytest.raises(StaleLockError) as err:
        preflight(NoEngine(), spec, "all", host=host("570.86.10", "12.8", A100))
    assert "envmgr lock sd-demo --variant cu128" in str(err.value)


def test_variant_is_a_spec_with_its_own_lock_pins_and_image(sd_demo):
    cu128 = variant_spec(sd_demo, "cu128")
    assert cu128.lock_path == sd_demo.folder / "variants" / "cu128"
    assert cu128.adapt.pin == {"torch": "2.10.0"} and sd_demo.adapt.pin == {}
    assert cu128.spec_hash() != sd_demo.spec_hash()
    assert cu128.env_prefix == sd_demo.env_prefix      # same method inside: only the pins differ
    assert "variants" in sd_demo.exclude                # no image carries a variant's lock
    assert variant_spec(sd_demo, None) is sd_demo and variant_spec(sd_demo, "default") is sd_demo


def test_spec_hash_ignores_what_does_not_change_an_image(sd_demo):
    more = sd_demo.model_copy(update={"gpu_memory_gb": 24.0})
    assert more.spec_hash() == sd_demo.spec_hash()


# ---------------------------------------------------------------------- host facts


class FakeNvml:
    class NVMLError(Exception):
        pass

    def __init__(self, fail_at=None):
        self.fail_at, self.shut = fail_at, False

    def _maybe(self, name):
        if self.fail_at == name:
            raise self.NVMLError(f"{name} failed")

    def nvmlInit(self):
        self._maybe("init")

    def nvmlShutdown(self):
        self.shut = True

    def nvmlSystemGetDriverVersion(self):
        return b"570.86.10"

    def nvmlSystemGetCudaDriverVersion(self):
        return 12080

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, index):
        self._maybe("handle")
        return index

    def nvmlDeviceGetName(self, handle):
        return ["NVIDIA A100-SXM4-80GB", "NVIDIA L4"][handle]

    def nvmlDeviceGetCudaComputeCapability(self, handle):
        return [(8, 0), (8, 9)][handle]

    def nvmlDeviceGetMemoryInfo(self, handle):
        return SimpleNamespace(total=[85_899_345_920, 24_152_899_584][handle])


def test_nvml_reads_driver_cuda_and_each_gpu():
    nvml = FakeNvml()
    facts = read_nvml(nvml)
    assert facts.driver == "570.86.10" and facts.cuda == "12.8" and facts.problem is None
    assert [(g.index, g.name, g.capability) for g in facts.gpus] == [(0, "NVIDIA A100-SXM4-80GB", (8, 0)),
                                                                       (1, "NVIDIA L4", (8, 9))]
    assert nvml.shut


@pytest.mark.parametrize("fail_at, says", [("init", "not usable"), ("handle", "failed while reading")])
def test_nvml_failures_become_a_problem_line(fail_at, says):
    facts = read_nvml(FakeNvml(fail_at))
    assert says in facts.problem and not facts.gpus


def test_probe_container_is_asked_when_nvml_is_absent():
    lines = ["0, NVIDIA H100 80GB HBM3, 9.0, 81559, 580.65.06", "1, NVIDIA H100 80GB HBM3, 9.0, 81559, 580.65.06",
             "CUDA Version: 13.0"]
    facts = read(probe=lambda: lines, nvml=FakeNvml("init"))
    assert facts.source == "probe container" and facts.driver == "580.65.06" and facts.cuda == "13.0"
    assert [g.capability for g in facts.gpus] == [(9, 0), (9, 0)] and facts.gpus[0].memory_bytes == 81559 << 20


def test_probe_failure_keeps_both_reasons():
    def refused():
        raise UsageError("cannot give the container GPUs: no NVIDIA runtime")

    facts = read(probe=refused, nvml=FakeNvml("init"))
    assert "init failed" in facts.problem and "no NVIDIA runtime" in facts.problem
    assert "no output" in parse_probe([]).problem


def test_sd_demo_locks_are_current_and_name_their_cuda(sd_demo):
    """Both shipped locks match their inputs, offline: the default CUDA 13.0, the cu128 variant CUDA 12.8."""
    from envmgr.build.gpu_image import lock_facts
    from envmgr.lock.backends import get_backend

    for name, torch, cuda in [(None, "2.13.0", "13.0"), ("cu128", "2.10.0", "12.8")]:
        spec = variant_spec(sd_demo, name)
        get_backend(spec).check(spec)
        facts = lock_facts(spec)
        assert (facts.torch, facts.cuda) == (torch, cuda) and facts.cudnn.startswith("9.")


def test_remote_engine_is_asked_through_a_probe_not_this_machines_nvml(sd_demo, monkeypatch):
    import envmgr.runs.gpu_plan as gpu_plan

    asked = []

    def run(container, on_line):
        asked.append(container)
        for line in ["0, NVIDIA L40S, 8.9, 46068, 570.86.10", "CUDA Version: 12.8"]:
            on_line(line)
        return 0

    ctx = NoEngine()
    ctx.config = SimpleNamespace(engine_url="tcp://gpu-server.example:2376")
    ctx.engine.run = run
    monkeypatch.setattr(gpu_plan, "ensure_base", lambda ctx, name: SimpleNamespace(image_id="sha256:base"))
    plan = preflight(ctx, sd_demo, "all")
    assert plan.host.source == "probe container" and plan.host.gpus[0].name == "NVIDIA L40S"
    assert plan.spec.variant == "cu128"                      # driver 570 on the engine's machine
    assert asked[0].network == "none" and asked[0].device_requests


def test_doctor_says_which_variant_this_host_runs_or_why_none(sd_demo):
    from envmgr.runs.gpu_plan import doctor_row

    check, status, ok = doctor_row(NoEngine(), host=host("570.86.10", "12.8", A100), methods=[sd_demo])
    assert ok and "driver 570.86.10 (CUDA 12.8)" in status and "sd-demo → cu128" in status
    _, status, ok = doctor_row(NoEngine(), host=host("470.256.02", "11.4", A100), methods=[sd_demo])
    assert not ok and "driver ≥ 525" in status
    _, status, ok = doctor_row(NoEngine(), host=HostGpuFacts(problem="NVML is not usable on this host (x)"),
                               methods=[sd_demo])
    assert ok and "--gpus none" in status
