"""A Slurm run's dataset as its dataset_mode asks: the submission extracts (or copies) it into the shared run
dir and records the mode; every job step finds that one copy through the record; a pyxis step mounts the
copy (read-only unless writable). Engine- and Slurm-free: the code `submit`, `run` and `pyxis_step` share."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest

from envmgr.core.errors import UsageError
from envmgr.core.spec import MethodSpec, find_method
from envmgr.runs import slurm
from envmgr.runs.plan import NodeStep, RunRequest, run_data

USER = f"{os.getuid()}:{os.getgid()}"


def _spec(**fields) -> MethodSpec:
    spec = MethodSpec(name="third", entry=["bash", "train.sh"], **fields)
    spec.builtin = False
    return spec


def _base(tmp_path: Path) -> tuple[Path, Path]:
    """A base dir whose datasets/ holds pets.zip (one top folder, as zipping a folder makes it)."""
    base = tmp_path / "base"
    (base / "datasets").mkdir(parents=True)
    archive = base / "datasets" / "pets.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("pets/images/1.jpg", "jpg")
        zf.writestr("pets/metadata.jsonl", "{}\n")
    return base, archive


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def _submitted(tmp_path: Path, spec: MethodSpec) -> tuple[Path, Path, dict]:
    """What `submit` does with the dataset: resolve, prepare into the run dir, record."""
    base = tmp_path / "base"
    if not (base / "datasets" / "pets.zip").exists():
        _base(tmp_path)
    run_dir = base / "runs" / spec.name / "r1"
    run_dir.mkdir(parents=True)
    data = run_data(base, RunRequest(method=spec, dataset="pets.zip"), None)
    prepared = data.prepare(spec, run_dir, USER)
    return base, run_dir, {"run_id": "r1", **data.record(prepared, run_dir, tmp_path / "cache")}


def test_submission_extracts_into_the_run_dir_records_the_mode_and_leaves_the_base_dataset(tmp_path):
    base, archive = _base(tmp_path)
    before = _snapshot(base / "datasets")
    _, run_dir, record = _submitted(tmp_path, _spec())
    entry = record["dataset"]
    assert entry["mode"] == "extracted" and entry["mounted_at"] == "/envmgr/data/pets"
    assert entry["copy"] == "dataset/pets/pets" and entry["path"] == str(archive)
    assert entry["name"] == "pets.zip" and entry["hash"]
    assert sorted(p.name for p in (run_dir / entry["copy"]).iterdir()) == ["images", "metadata.jsonl"]
    assert sorted(p.name for p in (base / "datasets").iterdir()) == ["pets.zip"]
    assert _snapshot(base / "datasets") == before


@pytest.mark.parametrize("rank", [0, 1])
def test_every_job_step_mounts_the_copy_the_submission_made(tmp_path, rank):
    spec = _spec(dataset_mode="writable")
    base, run_dir, record = _submitted(tmp_path, spec)
    copy = run_dir / record["dataset"]["copy"]
    assert copy.is_relative_to(run_dir / "work" / "dataset") and os.access(copy, os.W_OK)
    (copy / "index.json").write_text("written by the method")
    # a job step on a node: no --dataset, the record's path and mode
    step = RunRequest(method=spec, node=NodeStep(run_id="r1", run_dir=run_dir, rank=rank))
    data = run_data(base, step, record)
    assert data.dataset == base / "datasets" / "pets.zip" and data.recorded_mode == "writable"
    prepared = data.prepare(spec, run_dir, USER)
    assert prepared is not None and prepared.path == copy and not prepared.read_only
    assert (copy / "index.json").read_text() == "written by the method"    # not extracted again
    assert not (run_dir / f"work-rank{rank}").exists()                     # one copy for all ranks
    assert sorted(p.name for p in (run_dir / "work" / "dataset").iterdir()) == ["pets"]   # no partial left


def test_the_recorded_mode_holds_even_when_the_spec_changed_since_submission(tmp_path):
    base, run_dir, record = _submitted(tmp_path, _spec(dataset_mode="archive"))
    assert record["dataset"]["mode"] == "archive" and "copy" not in record["dataset"]
    changed = _spec(dataset_mode="writable")
    data = run_data(base, RunRequest(method=changed, node=NodeStep(run_id="r1", run_dir=run_dir)), record)
    prepared = data.prepare(changed, run_dir, USER)
    assert prepared is not None and prepared.path == base / "datasets" / "pets.zip" and prepared.read_only
    assert not (run_dir / "work" / "dataset").exists() and not (run_dir / "dataset").exists()


def test_a_recorded_dataset_outside_the_base_dirs_datasets_is_refused_for_a_step(tmp_path):
    base, run_dir, record = _submitted(tmp_path, _spec())
    outside = tmp_path / "elsewhere.zip"
    outside.write_bytes((base / "datasets" / "pets.zip").read_bytes())
    record["dataset"]["path"] = str(outside)
    with pytest.raises(UsageError, match="not under"):
        run_data(base, RunRequest(method=_spec(), node=NodeStep(run_id="r1", run_dir=run_dir)), record)


def _pyxis_mounts(tmp_path: Path, record: dict, run_dir: Path) -> str:
    spec = find_method("sd-demo", tmp_path / "base")
    record = {**record, "arguments": [], "model": None,
              "scheduler": {"gpus_per_node": 0, "image_source": {"kind": "squashfs", "file": "/shared/x.sqsh"}}}
    return "\n".join(slurm.pyxis_step(spec, record, run_dir))


def test_a_pyxis_step_mounts_the_extracted_copy_read_only_and_a_writable_one_read_write(tmp_path):
    _, run_dir, record = _submitted(tmp_path / "a", _spec())
    script = _pyxis_mounts(tmp_path, record, run_dir)
    assert f"{run_dir / 'dataset' / 'pets' / 'pets'}:/envmgr/data/pets:ro" in script
    assert "ENVMGR_DATASET_PATH=/envmgr/data/pets" in script and "datasets/pets.zip" not in script

    _, run_dir, record = _submitted(tmp_path / "b", _spec(dataset_mode="writable"))
    script = _pyxis_mounts(tmp_path, record, run_dir)
    writable = f"{run_dir / 'work' / 'dataset' / 'pets' / 'pets'}:/envmgr/data/pets"
    assert writable in script and f"{writable}:ro" not in script

    base, run_dir, record = _submitted(tmp_path / "c", _spec(dataset_mode="archive"))
    script = _pyxis_mounts(tmp_path, record, run_dir)
    assert f"{base / 'datasets' / 'pets.zip'}:/envmgr/data/pets.zip:ro" in script


def test_a_pyxis_step_refuses_a_recorded_copy_outside_the_run_dir(tmp_path):
    _, run_dir, record = _submitted(tmp_path, _spec())
    record["dataset"]["copy"] = "../../../datasets"
    with pytest.raises(UsageError, match="not inside"):
        _pyxis_mounts(tmp_path, record, run_dir)
