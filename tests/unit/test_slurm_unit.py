"""Engine-free parts of `--on slurm` and the enroot export: GPU ids from the allocation, the rendezvous
variables, the sbatch script, filesystem detection, layer whiteouts and enroot's two files."""

from __future__ import annotations

import io
import socket
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from envmgr.core.errors import UsageError
from envmgr.core.gpu import GpuRequest, parse_gpus
from envmgr.core.spec import find_method
from envmgr.runs import slurm
from envmgr.runs.ledger import settle
from envmgr.runs.plan import NodeStep
from envmgr.runs.records import read_record, write_record
from envmgr.ship.squashfs import apply_layer, write_enroot_files


def test_gpus_come_from_slurms_allocation_split_among_the_nodes_tasks(monkeypatch):
    for var in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_JOB_GPUS", "2,3,5,7")
    assert slurm.step_gpus(4, local=0, per_node=1) == ["2", "3", "5", "7"]
    assert slurm.step_gpus(4, local=1, per_node=2) == ["5", "7"]
    monkeypatch.setenv("SLURM_STEP_GPUS", "6")
    assert slurm.step_gpus(1, local=0, per_node=1) == ["6"]
    assert slurm.step_gpus(0, local=0, per_node=1) == []


def test_a_gpu_job_without_allocated_gpus_never_falls_back_to_all(monkeypatch):
    for var in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(UsageError, match="Slurm gave this step none"):
        slurm.step_gpus(2, local=0, per_node=1)


def test_rendezvous_gives_accelerate_rank_address_port_and_total_processes(monkeypatch):
    monkeypatch.setattr(slurm, "hostnames", lambda nodelist: ["gpu-a", "gpu-b"])
    monkeypatch.setattr(slurm, "node_address", lambda node: {"gpu-a": "10.0.0.5"}[node])
    env = slurm.rendezvous_env(rank=1, machines=2, job_id="4711", per_machine=4, nodelist="gpu-[a-b]")
    assert env["ACCELERATE_EXTRA_ARGS"] == ("--machine_rank=1 --main_process_ip=10.0.0.5 "
                                            "--main_process_port=24711 --multi_gpu")
    assert env["TRAINING_NUM_MACHINES"] == "2" and env["TRAINING_NUM_PROCESSES"] == "8"
    assert env["MASTER_ADDR"] == "10.0.0.5" and env["RANK"] == "1" and env["WORLD_SIZE"] == "2"
    one = slurm.rendezvous_env(rank=0, machines=2, job_id="1", per_machine=1, nodelist="gpu-[a-b]")
    assert "--multi_gpu" not in one["ACCELERATE_EXTRA_ARGS"] and one["TRAINING_NUM_PROCESSES"] == "2"
    cpu = slurm.rendezvous_env(rank=0, machines=2, job_id="1", per_machine=1, nodelist="gpu-[a-b]", cpu=True)
    assert cpu["ACCELERATE_EXTRA_ARGS"].endswith(" --cpu") and cpu["WORLD_SIZE"] == "2"


def _record(run_dir: Path) -> dict:
    return {"run_id": "r1", "arguments": ["--max_steps=5"], "model": None, "dataset": None,
            "scheduler": {"gpus_per_node": 2, "image_source": {"kind": "squashfs", "file": "/shared/x.sqsh"}}}


def test_sbatch_script_asks_slurm_for_the_allocation_and_runs_one_step_per_machine(tmp_path):
    ctx = SimpleNamespace(config=SimpleNamespace(base_dir=tmp_path / "base", cache_dir=tmp_path / "cache"))
    spec = find_method("sd-demo", tmp_path / "base")
    request = slurm.SlurmRequest(nodes=3, tasks_per_node=2, partition="gpu", time="1:00:00", account="lab")
    script = slurm.batch_script(ctx, spec, _record(tmp_path), tmp_path / "run", request)
    for line in ("#SBATCH --nodes=3", "#SBATCH --ntasks-per-node=2", "#SBATCH --gpus-per-node=2",
                 "#SBATCH --partition=gpu", "#SBATCH --time=1:00:00", "#SBATCH --account=lab",
                 f"#SBATCH --output={tmp_path / 'run'}/slurm-%j.out", f"export ENVMGR_BASE_DIR={tmp_path / 'base'}"):
        assert line in script
    assert "srun --kill-on-bad-exit=0 --ntasks-per-node=2" in script and "slurm-step" in script
    assert "--finish" in script.splitlines()[-2] and script.splitlines()[-1] == 'exit "$status"'
    pyxis = slurm.batch_script(ctx, spec, _record(tmp_path), tmp_path / "run",
                               slurm.SlurmRequest(runtime="pyxis"))
    assert "--container-image=/shared/x.sqsh" in pyxis
    # as a local run: only work/ and output/ are mounted writable, never the run dir with run.json and log.txt
    assert f"{tmp_path / 'run' / 'work'}:/envmgr/run," in pyxis
    assert f"{tmp_path / 'run' / 'output'}:/envmgr/run/output" in pyxis
    assert f"{tmp_path / 'run'}:/envmgr/run," not in pyxis and f"{tmp_path / 'run'}:/envmgr/run'" not in pyxis


def test_slurm_gpu_ids_become_gpu_indices_never_a_count():
    assert parse_gpus(slurm.gpu_indices(["3"])) == GpuRequest(kind="indices", indices=(3,))
    assert parse_gpus(slurm.gpu_indices(["5", "7"])) == GpuRequest(kind="indices", indices=(5, 7))
    assert parse_gpus(slurm.gpu_indices([])).kind == "none"


def test_each_rank_has_its_own_record_log_and_scratch_dir(tmp_path):
    zero, two = NodeStep("r", tmp_path, rank=0), NodeStep("r", tmp_path, rank=2)
    assert (zero.record_file, zero.log_file, zero.work_dir) == ("run.json", "log.txt", "work")
    assert (two.record_file, two.log_file, two.work_dir) == ("run-rank2.json", "log-rank2.txt", "work-rank2")


def _stale_slurm_record(run_dir: Path) -> dict:
    run_dir.mkdir(parents=True)
    record = {"run_id": "20261129-101010-abcd", "method": "sd-demo", "status": "running",
              "container": "envmgr-run-sd-demo-20261129-101010-abcd", "attempts": [{"status": "running"}],
              "envmgr": {"pid": 2**22 + 17, "pid_start": "1", "host": socket.gethostname()},   # no such process
              "scheduler": {"kind": "slurm", "job_id": "42"}}
    write_record(run_dir, record)
    return record


def test_settle_leaves_a_slurm_run_alone_while_slurm_has_its_job(tmp_path, monkeypatch):
    ctx = SimpleNamespace(engine=None, ui=SimpleNamespace(warn=lambda *a, **k: None))
    record = _stale_slurm_record(tmp_path / "run")
    for answer in (True, None):             # running in Slurm, or Slurm does not answer: not ours to settle
        monkeypatch.setattr(slurm, "job_alive", lambda scheduler, answer=answer: answer)
        assert settle(ctx, tmp_path / "run", dict(record))["status"] == "running"
    monkeypatch.setattr(slurm, "job_alive", lambda scheduler: False)    # the job is over, its step is gone
    engine = SimpleNamespace(container_state=lambda name: None)
    settled = settle(SimpleNamespace(engine=engine, ui=ctx.ui), tmp_path / "run", dict(record))
    assert settled["status"] == "failed" and read_record(tmp_path / "run")["status"] == "failed"


def test_job_alive_says_unknown_when_slurm_does_not_answer(monkeypatch):
    def down(job_ids, strict=False):
        raise slurm.SlurmError("Slurm does not answer")

    monkeypatch.setattr(slurm.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(slurm, "job_states", down)
    assert slurm.job_alive({"job_id": "42"}) is None
    monkeypatch.setattr(slurm, "job_states", lambda job_ids, strict=False: {"42": ("COMPLETED", "")})
    assert slurm.job_alive({"job_id": "42"}) is False
    monkeypatch.setattr(slurm, "job_states", lambda job_ids, strict=False: {"42": ("PENDING", "Resources")})
    assert slurm.job_alive({"job_id": "42"}) is True


def test_filesystem_type_reads_the_mount_table():
    assert slurm.filesystem_type(Path("/proc/self")) == "proc"
    assert slurm.filesystem_type(Path("/")) not in ("", "unknown")


def _layer(path: Path, files: dict[str, bytes | None]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_layers_apply_in_order_with_whiteouts(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    apply_layer(_layer(tmp_path / "1.tar", {"etc": None, "etc/a": b"1", "etc/b": b"1", "opt": None, "opt/x": b"x"}),
                root)
    apply_layer(_layer(tmp_path / "2.tar", {"etc/.wh.a": b"", "etc/b": b"2", "opt/.wh..wh..opq": b"",
                                            "opt/y": b"y"}), root)
    assert not (root / "etc" / "a").exists() and (root / "etc" / "b").read_bytes() == b"2"
    assert sorted(p.name for p in (root / "opt").iterdir()) == ["y"]


def test_enroot_files_hold_the_environment_and_the_entry(tmp_path):
    write_enroot_files(tmp_path, ["PATH=/usr/bin", "A=b c"], [], ["python", "/opt/m/main.py"], "/envmgr/run")
    assert (tmp_path / "etc" / "environment").read_text() == "PATH=/usr/bin\nA=b c\n"
    rc = (tmp_path / "etc" / "rc").read_text()
    assert "cd /envmgr/run" in rc and "exec python /opt/m/main.py" in rc and 'exec "$@"' in rc


@pytest.mark.parametrize(("extra", "said"), [({"registry": "127.0.0.1:5000"}, "envmgr push --sign KEY"),
                                             ({"runtime": "pyxis"}, "carries no signature")])
def test_sign_is_refused_where_the_nodes_do_not_import_an_archive(tmp_path, extra, said):
    from envmgr.core.errors import UsageError
    from envmgr.runs.slurm import SlurmRequest, _image_source

    with pytest.raises(UsageError, match="--sign signs the export archive") as refused:
        _image_source(None, None, "envmgr/m:0", "0" * 64, SlurmRequest(sign=tmp_path / "k", **extra))  # type: ignore[arg-type]
    assert said in refused.value.message
