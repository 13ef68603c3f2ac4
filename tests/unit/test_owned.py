"""Trees a method could write (work/, output/, its dataset and method copies) are never followed through a link:
mount sources, copies, chmod/chown, reads and artifact lists all go through envmgr/runs/owned.py. And the run-side
odds and ends of issue #22: archives with a path that is both a file and a folder, tar hard links,
`--input DIR/a:b`, and `--input`/`--env` of a Slurm submission."""

from __future__ import annotations

import io
import json
import os
import socket
import stat
import tarfile
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from envmgr.core import archive
from envmgr.core.errors import UsageError
from envmgr.core.spec import MethodSpec
from envmgr.door.containers import BindMount
from envmgr.runs import outputs as run_outputs, owned, slurm
from envmgr.runs.datasets import prepare_dataset
from envmgr.runs.inputs import parse_input, recorded_inputs
from envmgr.runs.plan import refusal_recorded as _refusal_recorded
from envmgr.runs.records import read_record, write_record
from envmgr.runs.run import _check_owned_mounts

USER = f"{os.getuid()}:{os.getgid()}"


def _spec(**fields) -> MethodSpec:
    spec = MethodSpec(name="third", entry=["bash", "train.sh"], **fields)
    spec.builtin = False
    return spec


def _flat_zip(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("a.txt", "a")
        zf.writestr("b.txt", "b")
    return path


# ---------------------------------------------------------------- mount sources and resume


def test_a_writable_dataset_copy_swapped_for_a_link_is_refused_on_resume(tmp_path):
    data = _flat_zip(tmp_path / "pets.zip")
    run_dir = tmp_path / "runs" / "third" / "r1"
    (run_dir / "work").mkdir(parents=True)
    spec = _spec(dataset_mode="writable")
    first = prepare_dataset(spec, data, run_dir, run_dir / "work", USER)
    assert first.path == run_dir / "work" / "dataset" / "pets" and not first.read_only
    # what the method does between its run and its resume: work/dataset stays a real folder
    (run_dir / "work" / "dataset").rename(run_dir / "work" / "dataset.old")
    (run_dir / "work" / "dataset").mkdir()
    (run_dir / "work" / "dataset" / "pets").symlink_to("/")
    with pytest.raises(owned.Refused, match="symbolic link"):
        prepare_dataset(spec, data, run_dir, run_dir / "work", USER)


@pytest.mark.parametrize("link_at", ["work", "work/dataset", "work/dataset/pets"])
def test_a_mount_source_with_a_link_at_any_level_is_refused(tmp_path, link_at):
    run_dir = tmp_path / "run"
    (run_dir / "elsewhere" / "dataset" / "pets").mkdir(parents=True)
    (run_dir / "work" / "dataset" / "pets").mkdir(parents=True)
    swapped = run_dir / link_at
    swapped.rename(tmp_path / "moved")
    swapped.symlink_to(run_dir / "elsewhere" / Path(link_at).relative_to("work") if link_at != "work"
                       else run_dir / "elsewhere")
    with pytest.raises(owned.Refused, match="symbolic link"):
        owned.mount_source(run_dir, "work/dataset/pets")
    mounts = [BindMount(run_dir / "work/dataset/pets", "/envmgr/data/pets", read_only=False)]
    with pytest.raises(owned.Refused):
        _check_owned_mounts(mounts, run_dir)


def test_a_mount_source_is_given_as_its_real_path(tmp_path):
    real = tmp_path / "real"
    (real / "run" / "work").mkdir(parents=True)
    (tmp_path / "base").symlink_to(real)        # a base dir reached through a link of the admin's is fine
    mounts = [BindMount(tmp_path / "base" / "run" / "work", "/envmgr/run", read_only=False)]
    _check_owned_mounts(mounts, tmp_path / "base" / "run")
    assert mounts[0].source == real / "run" / "work"


def test_an_input_that_became_a_link_since_it_was_chosen_is_not_mounted(tmp_path):
    given = tmp_path / "ckpt"
    given.mkdir()
    record = {"inputs": [{"name": "ckpt", "path": str(given)}]}
    assert recorded_inputs(record, tmp_path)[0].path == given
    given.rmdir()
    given.symlink_to("/")
    with pytest.raises(owned.Refused, match="symbolic link"):
        recorded_inputs(record, tmp_path)
    with pytest.raises(owned.Refused, match="symbolic link"):
        _check_owned_mounts([BindMount(given, "/envmgr/inputs/ckpt")], tmp_path / "run")


def test_output_and_work_are_never_made_through_a_link(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "output").symlink_to(tmp_path / "victim")
    with pytest.raises(owned.Refused):
        owned.ensure_folder(run_dir, "output")
    assert not (tmp_path / "victim").exists()
    assert owned.ensure_folder(run_dir, "work") == run_dir / "work" and (run_dir / "work").is_dir()


def test_a_refused_resume_is_recorded_and_a_failed_new_run_leaves_no_run_dir(tmp_path):
    run_dir = tmp_path / "r1"
    run_dir.mkdir()
    record = {"run_id": "r1", "method": "third", "status": "succeeded", "attempts": [{"status": "succeeded"}]}
    write_record(run_dir, record)
    with pytest.raises(owned.Refused), _refusal_recorded(run_dir, record, "run.json"):
        raise owned.Refused("work/dataset/pets is a symbolic link")
    again = read_record(run_dir)
    assert again["status"] == "failed" and again["reason"].startswith("refused: work/dataset/pets")
    assert [a["status"] for a in again["attempts"]] == ["succeeded", "failed"]
    assert "refused to start" in (run_dir / "log.txt").read_text()
    new = tmp_path / "r2"
    new.mkdir()
    with pytest.raises(UsageError), _refusal_recorded(new, None, "run.json"):
        raise UsageError("pets.zip: 'a' is both a file and a folder in the archive")
    assert not new.exists()


def test_giving_a_copy_to_the_run_user_never_changes_what_a_link_names(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("host file")
    victim.chmod(0o600)
    run_dir = tmp_path / "run"
    (run_dir / "work" / "method").mkdir(parents=True)
    (run_dir / "work" / "method" / "train.sh").write_text("echo\n")
    (run_dir / "work" / "method" / "train.sh").chmod(0o400)
    (run_dir / "work" / "method" / "victim").symlink_to(victim)
    owned.give(run_dir, "work/method", None, dir_bits=0o700, file_bits=0o600)
    assert stat.S_IMODE((run_dir / "work" / "method" / "train.sh").stat().st_mode) == 0o600
    assert stat.S_IMODE(victim.stat().st_mode) == 0o600


# ---------------------------------------------------------------- outputs


def _hostile_output(run_dir: Path, outside: Path) -> Path:
    out = run_dir / "output"
    (out / "validation_images").mkdir(parents=True)
    (out / "lora.safetensors").write_text("w")
    (out / "lora.safetensors").chmod(0o600)
    (out / "tool").write_text("#!/bin/sh\n")
    (out / "tool").chmod(0o6755)
    (out / "stolen.safetensors").symlink_to("/etc/shadow")
    (out / "checkpoint-9").symlink_to("/etc")
    (out / "checkpoint-1").mkdir()
    (out / "validation_images" / "ok.png").write_text("png")
    (out / "validation_images" / "leak.png").symlink_to("/etc/passwd")
    os.mkfifo(out / "pipe")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(out / "sock"))
    sock.close()
    outside.write_text("elsewhere")
    outside.chmod(0o600)
    os.link(outside, out / "linked.safetensors")     # a name outside output/ too
    return out


def test_links_and_special_files_in_output_are_refused_by_name_never_listed(tmp_path):
    run_dir = tmp_path / "run"
    out = _hostile_output(run_dir, tmp_path / "outside")
    found = run_outputs.inspect(run_dir)
    assert found.artifacts() == {"lora": ["output/lora.safetensors"], "checkpoints": ["output/checkpoint-1"],
                                 "validation_images": ["output/validation_images/ok.png"], "loss_plot": [],
                                 "metrics": []}
    refused = {r["path"]: r["reason"] for r in found.refused}
    assert refused == {"output/stolen.safetensors": "a symbolic link (to '/etc/shadow')",
                       "output/checkpoint-9": "a symbolic link (to '/etc')",
                       "output/validation_images/leak.png": "a symbolic link (to '/etc/passwd')",
                       "output/pipe": "a named pipe (FIFO)", "output/sock": "a socket",
                       "output/linked.safetensors": "a hard link (2 names, some outside output/)"}
    assert stat.S_IMODE((out / "tool").stat().st_mode) == 0o6755    # inspecting alone changes nothing


def test_an_empty_output_lists_no_artifacts_and_a_missing_one_none_at_all(tmp_path):
    assert run_outputs.artifacts(tmp_path) == {}
    (tmp_path / "output").mkdir()
    assert run_outputs.artifacts(tmp_path) == {"lora": [], "checkpoints": [], "validation_images": [],
                                               "loss_plot": [], "metrics": []}


def test_outputs_are_handed_over_with_setuid_dropped_and_links_untouched(tmp_path):
    run_dir = tmp_path / "run"
    out = _hostile_output(run_dir, tmp_path / "outside")
    shadow_mode = stat.S_IMODE(Path("/etc/shadow").stat().st_mode)
    found = run_outputs.inspect(run_dir, run_outputs.Handover(everyone=True))
    assert stat.S_IMODE((out / "tool").stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "lora.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE(out.stat().st_mode) & 0o555 == 0o555
    assert stat.S_IMODE((tmp_path / "outside").stat().st_mode) == 0o600     # the hard link's other name
    assert stat.S_IMODE(Path("/etc/shadow").stat().st_mode) == shadow_mode
    assert found.changed == [{"path": "output/tool", "change": "setuid and setgid dropped"}]


@pytest.mark.skipif(os.getuid() != 0, reason="hands files to another user: needs root")
def test_under_sudo_outputs_belong_to_the_sudo_user(tmp_path, monkeypatch):
    monkeypatch.setenv("SUDO_UID", "4321")
    monkeypatch.setenv("SUDO_GID", "4322")
    handover = run_outputs.Handover.for_invoker()
    assert handover == run_outputs.Handover(owner=(4321, 4322)) and handover.recorded() == "4321:4322"
    assert run_outputs.Handover.from_record("4321:4322") == handover
    run_dir = tmp_path / "run"
    out = _hostile_output(run_dir, tmp_path / "outside")
    run_outputs.inspect(run_dir, handover)
    assert (out / "lora.safetensors").stat().st_uid == 4321 and out.stat().st_gid == 4322
    assert os.lstat(out / "stolen.safetensors").st_uid == 0 and (tmp_path / "outside").stat().st_uid == 0
    monkeypatch.delenv("SUDO_UID")
    assert run_outputs.Handover.for_invoker() == run_outputs.Handover(everyone=True)


# ---------------------------------------------------------------- archives


def test_a_zip_holding_a_file_and_a_folder_of_one_name_is_a_usage_error(tmp_path):
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("a", "file")
        zf.writestr("a/b", "under it")
    (tmp_path / "dest").mkdir()
    with pytest.raises(UsageError, match="both a file and a folder"):
        archive.extract(bad, tmp_path / "dest")
    assert list((tmp_path / "dest").iterdir()) == []


def test_a_tar_holding_a_link_and_a_folder_of_one_name_is_a_usage_error(tmp_path):
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tf:
        link = tarfile.TarInfo("a")
        link.type, link.linkname = tarfile.SYMTYPE, "elsewhere"
        tf.addfile(link)
        tf.addfile(tarfile.TarInfo("a/b"), io.BytesIO(b""))
    (tmp_path / "dest").mkdir()
    with pytest.raises(UsageError, match="both a file and a folder"):
        archive.extract(bad, tmp_path / "dest")


def test_a_tar_hard_link_is_extracted_as_a_copy_of_its_target(tmp_path):
    good = tmp_path / "good.tar"
    with tarfile.open(good, "w") as tf:
        info = tarfile.TarInfo("images/1.jpg")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"jpg"))
        hard = tarfile.TarInfo("copies/1.jpg")
        hard.type, hard.linkname = tarfile.LNKTYPE, "images/1.jpg"
        tf.addfile(hard)
    dest = tmp_path / "dest"
    dest.mkdir()
    archive.extract(good, dest)
    assert (dest / "copies" / "1.jpg").read_bytes() == b"jpg"
    assert (dest / "copies" / "1.jpg").stat().st_nlink == 1


def test_a_tar_hard_link_to_nothing_extracted_is_refused(tmp_path):
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tf:
        hard = tarfile.TarInfo("copy")
        hard.type, hard.linkname = tarfile.LNKTYPE, "missing"
        tf.addfile(hard)
    (tmp_path / "dest").mkdir()
    with pytest.raises(UsageError, match="hard link"):
        archive.extract(bad, tmp_path / "dest")


# ---------------------------------------------------------------- --input and Slurm


def test_input_whole_path_wins_over_path_and_name(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a:b").mkdir()
    with pytest.raises(UsageError, match="usable name"):   # `a:b` itself, which needs a name: never `a` named b
        parse_input(f"{tmp_path}/a:b")
    given = parse_input(f"{tmp_path}/a:b:named")
    assert given.path == tmp_path / "a:b" and given.name == "named"
    other = parse_input(f"{tmp_path}/a:c")       # no `a:c` there: the path `a`, named `c`
    assert other.path == tmp_path / "a" and other.name == "c"


def test_pyxis_step_applies_the_recorded_inputs_and_env(tmp_path):
    spec = _spec()
    spec.folder = tmp_path
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    record = {"run_id": "20261129-101010-abcd", "arguments": [], "inputs": [{"name": "ckpt", "path": str(ckpt)}],
              "env": {"WANDB_MODE": "offline now"}, "scheduler": {"image_source": {"file": "/x.sqsh"}}}
    lines = "\n".join(slurm.pyxis_step(spec, record, tmp_path / "run"))
    assert f"{ckpt}:/envmgr/inputs/ckpt:ro" in lines and "ENVMGR_INPUTS_DIR=/envmgr/inputs" in lines
    assert "WANDB_MODE='offline now'" in lines


def _submit(tmp_path, monkeypatch, **request_fields) -> dict:
    """What `submit` does before sbatch, with Slurm, the engine and the image left out."""
    from envmgr.build import target as build_target
    from envmgr.runs.plan import RunRequest

    monkeypatch.setattr(slurm, "_check_request", lambda request, spec, s: 0)
    monkeypatch.setattr(slurm, "_image_source", lambda *a: {"kind": "archive", "file": "x"})
    monkeypatch.setattr(slurm, "batch_script", lambda *a: "#!/bin/bash\n")
    monkeypatch.setattr(slurm, "_slurm", lambda args, check=True: SimpleNamespace(returncode=0, stdout="42\n",
                                                                                   stderr=""))
    monkeypatch.setattr(build_target, "target", lambda ctx, spec: SimpleNamespace(digest="sha256:1", tag="envmgr/t:1",
                                                                          lock_hash="sha256:2"))
    ctx = SimpleNamespace(config=SimpleNamespace(base_dir=tmp_path / "base",
                                                 run=SimpleNamespace(run_as="65534:65534")),
                          cache_dir=tmp_path / "cache", engine=SimpleNamespace(image_id=lambda tag: "sha256:3"),
                          ui=SimpleNamespace(step=lambda *a, **k: None))
    return slurm.submit(ctx, RunRequest(method=_spec(), **request_fields), slurm.SlurmRequest())


def test_a_slurm_submission_records_input_and_env_for_its_steps(tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    record = _submit(tmp_path, monkeypatch, inputs=[f"{ckpt}:start"], env=["WANDB_MODE=offline"])
    assert [(i["name"], i["path"]) for i in record["inputs"]] == [("start", str(ckpt))]
    assert record["env"] == {"WANDB_MODE": "offline"}
    run_dir = tmp_path / "base" / "runs" / "third" / record["run_id"]
    assert json.loads((run_dir / "run.json").read_text())["env"] == {"WANDB_MODE": "offline"}


def test_a_slurm_submission_whose_dataset_will_not_extract_leaves_no_run_dir(tmp_path, monkeypatch):
    datasets = tmp_path / "base" / "datasets"
    datasets.mkdir(parents=True)
    with zipfile.ZipFile(datasets / "bad.zip", "w") as zf:
        zf.writestr("a", "file")
        zf.writestr("a/b", "under it")
    with pytest.raises(UsageError, match="both a file and a folder"):
        _submit(tmp_path, monkeypatch, dataset="bad.zip")
    assert list((tmp_path / "base" / "runs" / "third").iterdir()) == []


# ---------------------------------------------------------------- bounded by default


def _limits(monkeypatch, host_gib: int, request_fields: dict | None = None, spec_limits: dict | None = None,
            **site):
    from envmgr.runs import run as run_module
    from envmgr.runs.plan import RunRequest
    from envmgr.runs.run import Limits

    monkeypatch.setattr(run_module, "_host_memory", lambda: host_gib << 30)
    run_config = SimpleNamespace(**{"memory": None, "shm_size": None, "tmp_size": None, **site})
    ctx = SimpleNamespace(config=SimpleNamespace(run=run_config))
    return Limits.of(ctx, RunRequest(method=_spec(limits=spec_limits or {}), **(request_fields or {})))


def test_memory_shm_and_tmp_are_bounded_by_default_following_the_host(monkeypatch):
    assert _limits(monkeypatch, 64) == _limits_of("57344m", "16384m", "8192m")
    assert _limits(monkeypatch, 8) == _limits_of("7168m", "2048m", "1792m")


def test_limits_follow_the_flags_and_the_site_config(monkeypatch):
    limits = _limits(monkeypatch, 64, {"memory": "4g"})
    assert limits == _limits_of("4g", "4096m", "1024m")      # no tmpfs larger than the memory limit allows
    assert _limits(monkeypatch, 64, {"shm_size": "1g"}, tmp_size="2g").tmp == "2g"
    assert _limits(monkeypatch, 64, {"shm_size": "1g"}).shm == "1g"
    with pytest.raises(UsageError, match="tmp_size"):
        _limits(monkeypatch, 64, tmp_size="lots")


def test_a_spec_says_what_its_runs_need_within_what_the_host_and_the_site_allow(monkeypatch):
    wants = {"memory": "500g", "shm_size": "32g", "tmp_size": "20g"}
    assert _limits(monkeypatch, 256, spec_limits=wants) == _limits_of("229376m", "32768m", "20480m")
    assert _limits(monkeypatch, 64, spec_limits=wants) == _limits_of("57344m", "32768m", "20480m")
    assert _limits(monkeypatch, 64, spec_limits=wants, memory="16g") == _limits_of("16g", "16384m", "16384m")
    assert _limits(monkeypatch, 64, {"shm_size": "1g"}, spec_limits=wants).shm == "1g"
    spec = _spec()
    assert _spec(limits=wants).spec_hash() == spec.spec_hash()     # no rebuild for a run's limits


def _limits_of(memory: str, shm: str, tmp: str):
    from envmgr.runs.run import Limits

    return Limits(memory, shm, tmp)


def test_the_run_containers_tmp_has_a_size():
    from envmgr.door.containers import ContainerSpec

    spec = ContainerSpec(image="x", command=["true"]).hardened(tmp_size="512m", mem_limit="4g")
    assert spec.tmpfs["/tmp"].endswith(",size=512m") and spec.mem_limit == "4g"


def test_a_nodes_image_lock_in_tmp_is_never_opened_through_a_link(tmp_path, monkeypatch):
    victim = tmp_path / "victim"
    victim.write_text("host file\n")
    tag = "envmgr/t:linkedlock" + str(os.getpid())
    lock = Path("/tmp") / f"envmgr-image-linkedlock{os.getpid()}.lock"
    lock.symlink_to(victim)
    try:
        ctx = SimpleNamespace(engine=SimpleNamespace(image_id=lambda tag: None))
        record = {"image": {"tag": tag, "id": "sha256:1"}, "scheduler": {"image_source": {"kind": "none"}}}
        with pytest.raises(UsageError, match="will not use it"):
            slurm.ensure_image(ctx, _spec(), record)
        assert victim.read_text() == "host file\n"
    finally:
        lock.unlink()
