"""`envmgr run --on slurm` against a real one-node Slurm cluster on loopback (munged, slurmctld, slurmd from
Debian's slurm-wlm): submit, follow, state, cancel, resume, the image reaching the node by registry or
archive, two machines of one run, the enroot squashfs export, doctor, and each bad input's one line.

The method is `tiny-slurm`, the `tiny` fixture with a main that counts steps (a checkpoint per step, SIGTERM
ends it with exit 130 and `--resume` continues from the last checkpoint) and prints its rank variables.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from tests.integration.conftest import TINY_PYPROJECT, TINY_SPEC, Workspace
from tests.support.said import error_lines
from tests.support.slurm import slurm_cluster  # noqa: F401 - the session's cluster

pytestmark = pytest.mark.engine

NAME = "tiny-slurm"
REPO = f"envmgr/{NAME}"

MAIN = r"""
import json, os, signal, sys, time
import envmgr_alpha
print("container started at", repr(time.time()), flush=True)
print(envmgr_alpha.GREETING, "rank", os.environ.get("ENVMGR_MACHINE_RANK"), "of",
      os.environ.get("ENVMGR_NUM_MACHINES"), "extra", os.environ.get("ACCELERATE_EXTRA_ARGS"),
      "world", os.environ.get("WORLD_SIZE"), flush=True)
data = os.environ.get("ENVMGR_DATASET_PATH")
if data:
    print("dataset", data, sorted(os.listdir(data)), "writable", os.access(data, os.W_OK), flush=True)
steps = int(next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--steps=")), "3"))
delay = float(next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--delay=")), "0.05"))
out = os.environ["ENVMGR_OUTPUT_DIR"]
rank = int(os.environ.get("ENVMGR_MACHINE_RANK", "0"))
done = [int(p.split("-")[1]) for p in os.listdir(out) if p.startswith("checkpoint-")]
start = max(done) if ("--resume" in sys.argv and done) else 0
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
for step in range(start + 1, steps + 1):
    if stop:
        print("stopping at", step - 1, flush=True)
        sys.exit(130)
    time.sleep(delay)
    if rank == 0:
        os.makedirs(os.path.join(out, f"checkpoint-{step}"), exist_ok=True)
        print(json.dumps({"event": "progress", "step": step, "max_steps": steps, "loss": 0.5, "s_per_step": delay}),
              flush=True)
if rank == 0:
    open(os.path.join(out, "done.txt"), "w").write(f"resumed from {start}\n")
print("finished", flush=True)
"""


def _events(proc) -> list[dict]:
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def site(tmp_path_factory, store, engine, mirror_a, slurm_cluster):  # noqa: F811
    """A base dir with `tiny-slurm` locked and built, and a CLI bound to it and to the cluster."""
    root = tmp_path_factory.mktemp("slurm-site")
    ws = Workspace(root / "base", root / "cache", store)
    ws.method_dir = root / "base" / "methods" / NAME
    ws.method_dir.mkdir(parents=True)
    (ws.method_dir / "envmgr.toml").write_text(TINY_SPEC.replace('name = "tiny"', f'name = "{NAME}"'))
    (ws.method_dir / "pyproject.toml").write_text(TINY_PYPROJECT)
    (ws.method_dir / "main.py").write_text(MAIN)
    ws.cluster = slurm_cluster
    ws.mirror = mirror_a.url
    ws.envmgr("lock", NAME, mirror=mirror_a.url)
    ws.envmgr("build", NAME, mirror=mirror_a.url)
    yield ws
    slurm_cluster.cancel_all()
    for image in engine.images.list(REPO):
        engine.images.remove(image.id, force=True)
    shutil.rmtree(root, ignore_errors=True)


def _run(site, *args, check=True, **env):
    return site.envmgr(*args, check=check, **site.cluster.env, **env)


def _record(site, run_id) -> dict:
    return json.loads((site.base_dir / "runs" / NAME / run_id / "run.json").read_text())


def _no_run_containers(engine, run_id) -> bool:
    return not engine.containers.list(all=True, filters={"label": f"org.envmgr.run-id={run_id}"})


def _wait_for(predicate, timeout=120.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _release_held_job(site, run_id: str) -> None:
    """Open the held partition until the job queued there ends, then close it again."""
    subprocess.run(["scontrol", "update", "PartitionName=held", "State=UP"], check=True,
                   env={**os.environ, **site.cluster.env})
    try:
        _wait_for(lambda: _record(site, run_id)["status"] in ("succeeded", "failed"), what="the held job")
    finally:
        subprocess.run(["scontrol", "update", "PartitionName=held", "State=DOWN"], check=True,
                       env={**os.environ, **site.cluster.env})


def test_submit_and_wait_runs_like_a_local_run_and_records_the_job(site, engine):
    proc = _run(site, "--json", "run", NAME, "--on", "slurm", "--wait", "--", "--steps=3")
    events = _events(proc)
    assert [e["step"] for e in events if e.get("event") == "method.progress"] == [1, 2, 3]
    run_id = [e for e in events if e.get("event") == "done"][-1]["run_id"]
    record = _record(site, run_id)
    sched = record["scheduler"]
    assert record["status"] == "succeeded" and record["exit_code"] == 0
    assert sched["kind"] == "slurm" and sched["job_id"].isdigit() and sched["nodes"] == [site.cluster.node]
    assert sched["image_source"]["kind"] == "archive" and Path(sched["image_source"]["file"]).is_file()
    assert record["image"]["id"].startswith("sha256:") and record["network"] == "none" and record["gpus"] == "none"
    run_dir = site.base_dir / "runs" / NAME / run_id
    script = (run_dir / "job.sbatch").read_text()
    assert "#SBATCH --nodes=1" in script and "slurm-step" in script
    assert "rank 0 of 1" in (run_dir / "log.txt").read_text()
    assert (run_dir / "output" / "done.txt").is_file()
    # the step's container is the local run's: hardened, not root unless asked, output/ handed to that user
    run_uid = int(record["run_as"].split(":")[0])
    assert record["as_root"] is False and (run_uid != 0 or os.getuid() != 0)
    assert (run_dir / "output").stat().st_uid == run_uid
    assert record["envmgr"]["host"] and record["container"] == f"envmgr-run-{NAME}-{run_id}"
    assert _no_run_containers(engine, run_id)
    listed = [r for r in _events(_run(site, "--json", "runs"))[-1]["runs"] if r["run_id"] == run_id]
    assert listed[0]["status"] == "succeeded"


def test_pending_state_then_the_node_imports_the_archive_when_it_lacks_the_image(site, engine):
    proc = _run(site, "--json", "run", NAME, "--on", "slurm", "--partition", "held", "--", "--steps=2")
    run_id = [e for e in _events(proc) if e.get("event") == "done"][-1]["run_id"]
    shown = _events(_run(site, "--json", "runs", "show", run_id))[-1]
    assert shown["status"] == "pending" and shown["scheduler"]["reason"] == "PartitionDown"
    tag = _record(site, run_id)["image"]["tag"]
    for image in engine.images.list(REPO):            # the "node" lacks the image now
        engine.images.remove(image.id, force=True)
    _release_held_job(site, run_id)
    record = _record(site, run_id)
    assert record["status"] == "succeeded", record
    assert "importing" in (site.base_dir / "runs" / NAME / run_id / f"slurm-{record['scheduler']['job_id']}.out"
                           ).read_text()
    assert engine.images.get(tag).id == record["image"]["id"]


def test_cancel_mid_run_records_interrupted_leaves_no_container_and_resume_finishes(site, engine):
    proc = _run(site, "--json", "run", NAME, "--on", "slurm", "--", "--steps=400", "--delay=0.1")
    run_id = [e for e in _events(proc) if e.get("event") == "done"][-1]["run_id"]
    run_dir = site.base_dir / "runs" / NAME / run_id
    _wait_for(lambda: len(list((run_dir / "output").glob("checkpoint-*"))) >= 3, what="three checkpoints")
    assert _events(_run(site, "--json", "runs", "show", run_id))[-1]["status"] == "running"
    cancelled = _run(site, "--json", "runs", "cancel", run_id)
    assert _events(cancelled)[-1]["status"] == "interrupted"
    record = _record(site, run_id)
    assert record["status"] == "interrupted" and record["attempts"][-1]["status"] == "interrupted"
    kept = len(list((run_dir / "output").glob("checkpoint-*")))
    assert 3 <= kept < 400
    assert _no_run_containers(engine, run_id)

    local = _run(site, "run", NAME, "--resume", run_id, check=False)     # not on this engine: on Slurm
    assert local.returncode == 2 and f"--resume {run_id} --on slurm" in local.stderr
    resumed = _run(site, "--json", "run", NAME, "--resume", run_id, "--on", "slurm", "--wait")
    record = _record(site, run_id)
    assert record["status"] == "succeeded" and len(record["attempts"]) == 2
    assert len(record["scheduler"]["jobs"]) == 2 and record["arguments"][-1] == "--resume"
    assert (run_dir / "output" / "done.txt").read_text().strip() == f"resumed from {kept}"
    assert resumed.returncode == 0


def test_image_reaches_the_node_through_the_registry_after_the_local_copy_was_removed(site, engine, tmp_path):
    from tests.integration.test_transfer import _start_registry

    registry_proc, registry = _start_registry(tmp_path / "registry")
    try:
        site.envmgr("build", NAME, mirror=site.mirror)
        site.envmgr("push", NAME, registry)
        for image in engine.images.list(REPO):
            engine.images.remove(image.id, force=True)
        proc = _run(site, "--json", "run", NAME, "--on", "slurm", "--registry", registry, "--wait", "--",
                    "--steps=2")
        run_id = [e for e in _events(proc) if e.get("event") == "done"][-1]["run_id"]
        record = _record(site, run_id)
        assert record["status"] == "succeeded"
        reference = f"{registry}/{REPO}:{record['image']['tag'].split(':')[1]}"
        assert record["scheduler"]["image_source"] == {"kind": "registry", "registry": registry, "reference": reference}
        out = (site.base_dir / "runs" / NAME / run_id / f"slurm-{record['scheduler']['job_id']}.out").read_text()
        assert "pulling" in out
        assert engine.images.get(record["image"]["tag"]).id == record["image"]["id"]
    finally:
        registry_proc.terminate()
        registry_proc.wait()


def test_two_machines_of_one_run_share_the_run_dir_with_ranks_and_host_network(site, engine):
    proc = _run(site, "--json", "run", NAME, "--on", "slurm", "--tasks-per-node", "2", "--wait", "--",
                "--steps=2")
    run_id = [e for e in _events(proc) if e.get("event") == "done"][-1]["run_id"]
    run_dir = site.base_dir / "runs" / NAME / run_id
    record = _record(site, run_id)
    assert record["status"] == "succeeded" and record["network"] == "host"
    assert record["scheduler"]["machines"] == 2
    rank1 = json.loads((run_dir / "run-rank1.json").read_text())
    assert rank1["status"] == "succeeded"
    port = 20000 + int(record["scheduler"]["job_id"]) % 20000
    assert f"rank 0 of 2 extra --machine_rank=0 --main_process_ip=127.0.0.1 --main_process_port={port} --cpu world 2" \
        in (run_dir / "log.txt").read_text()
    assert "rank 1 of 2 extra --machine_rank=1" in (run_dir / "log-rank1.txt").read_text()
    # each rank its own scratch and container; run.json and the logs are never mounted
    assert (run_dir / "work").is_dir() and (run_dir / "work-rank1").is_dir()
    assert rank1["container"] == record["container"] + "-rank1"
    assert _no_run_containers(engine, run_id)


def test_an_added_methods_archive_dataset_is_extracted_at_submission_and_the_base_dir_keeps_its_zip(site):
    """dataset_mode under Slurm as on a local run: `tiny-slurm` is an added method, so an archive is extracted."""
    datasets = site.base_dir / "datasets"
    datasets.mkdir(parents=True, exist_ok=True)
    archive = datasets / "slurm-pets.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("slurm-pets/images/1.jpg", "jpg")
        zf.writestr("slurm-pets/metadata.jsonl", "{}\n")
    before = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in datasets.iterdir()}
    proc = _run(site, "--json", "run", NAME, "--on", "slurm", "--partition", "held", "--dataset", "slurm-pets.zip",
                "--", "--steps=1")
    run_id = [e for e in _events(proc) if e.get("event") == "done"][-1]["run_id"]
    run_dir = site.base_dir / "runs" / NAME / run_id
    pending = _record(site, run_id)
    assert pending["status"] == "pending"       # extracted on the submitting host, before any step ran
    assert {k: pending["dataset"][k] for k in ("mode", "mounted_at", "copy")} == {
        "mode": "extracted", "mounted_at": "/envmgr/data/slurm-pets", "copy": "dataset/slurm-pets/slurm-pets"}
    assert sorted(p.name for p in (run_dir / "dataset" / "slurm-pets" / "slurm-pets").iterdir()) == \
        ["images", "metadata.jsonl"]
    _release_held_job(site, run_id)
    record = _record(site, run_id)
    assert record["status"] == "succeeded", record
    assert record["dataset"]["mode"] == "extracted" and record["dataset"]["copy"] == pending["dataset"]["copy"]
    assert "dataset /envmgr/data/slurm-pets ['images', 'metadata.jsonl'] writable False" in \
        (run_dir / "log.txt").read_text()
    assert {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in datasets.iterdir()} == before


# ---------------------------------------------------------------------- bad input: one clear line each


def test_no_slurm_is_one_line(site, tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    proc = _run(site, "run", NAME, "--on", "slurm", check=False, PATH=str(empty))
    assert proc.returncode == 2
    assert "Slurm not found: no `sinfo` on PATH" in proc.stderr and len(error_lines(proc.stderr)) <= 2


def test_unknown_partition_and_zero_nodes_are_one_line_each(site):
    proc = _run(site, "run", NAME, "--on", "slurm", "--partition", "nope", check=False)
    assert proc.returncode == 2
    assert "partition 'nope' is not known to Slurm (partitions: debug, held)" in proc.stderr
    proc = _run(site, "run", NAME, "--on", "slurm", "--nodes", "0", check=False)
    assert proc.returncode == 2 and "--nodes 0: a Slurm run needs at least 1 node" in proc.stderr


def test_a_job_pending_past_wait_timeout_is_cancelled_in_one_line(site):
    started = time.monotonic()
    proc = _run(site, "run", NAME, "--on", "slurm", "--partition", "held", "--wait", "--wait-timeout", "2",
                check=False)
    assert proc.returncode == 1 and time.monotonic() - started < 60
    assert "still pending after 2 s (reason: PartitionDown); cancelled it" in proc.stderr
    run_id = proc.stderr.split("run ")[-1].split()[0] if "run " in proc.stderr else None
    records = [json.loads(p.read_text()) for p in (site.base_dir / "runs" / NAME).glob("*/run.json")]
    failed = [r for r in records if "pending for more than 2 s" in (r.get("reason") or "")]
    assert failed and failed[-1]["status"] == "failed", run_id


def test_a_base_dir_the_job_cannot_see_is_one_line(site, tmp_path):
    """The submitter sees the base dir (a private tmpfs in its own mount namespace); the node does not."""
    hidden = tmp_path / "not-shared"
    envmgr_cmd = " ".join([sys.executable, "-m", "envmgr", "run", NAME, "--on", "slurm", "--wait"])
    script = (f"mkdir -p {hidden} && mount -t tmpfs none {hidden} && cp -a {site.base_dir}/methods {hidden}/ "
              f"&& exec {envmgr_cmd}")
    env = site.env(ENVMGR_BASE_DIR=str(hidden), **site.cluster.env)
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c", script], env=env,
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2], timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "no step wrote to" in proc.stderr and "base dir on storage the nodes share" in proc.stderr


# ---------------------------------------------------------------------- enroot image, doctor


def test_squashfs_export_holds_the_image_tree_and_its_environment(site, engine, tmp_path):
    if not shutil.which("unsquashfs"):
        pytest.fail("unsquashfs missing: apt-get install squashfs-tools")
    out = tmp_path / "tiny.sqsh"
    _run(site, "export", NAME, "--format", "squashfs", "-o", str(out))
    image = engine.images.get(REPO + ":latest")
    tree = tmp_path / "tree"
    subprocess.run(["unsquashfs", "-q", "-n", "-d", str(tree), str(out)], check=True)
    # the image's own tree, as the engine flattens it (a created, never started container)
    container = engine.containers.create(image.id, ["true"])
    try:
        flat = tmp_path / "flat.tar"
        with open(flat, "wb") as fh:
            for chunk in container.export():
                fh.write(chunk)
    finally:
        container.remove(force=True)
    injected = {".dockerenv", "etc/hostname", "etc/hosts", "etc/resolv.conf", "etc/mtab", "dev", "proc", "sys"}
    injected |= {"etc/environment", "etc/rc"}   # the two files an enroot image adds (checked below)
    engine_view = {}
    with tarfile.open(flat) as tar:
        members = {m.name.rstrip("/"): m for m in tar}
    for name, m in members.items():
        if name in injected or name.split("/")[0] in ("dev", "proc", "sys"):
            continue
        if m.islnk():   # a hard link: a regular file with its target's size
            m = members[m.linkname.rstrip("/")]
        engine_view[name] = (tarfile.REGTYPE if m.isfile() else m.type, m.mode & 0o7777, m.size if m.isfile() else 0,
                             m.linkname if m.issym() else "")
    ours = {}
    for path in tree.rglob("*"):
        rel = str(path.relative_to(tree))
        if rel in injected or rel.split("/")[0] in ("dev", "proc", "sys"):
            continue
        st = path.lstat()
        kind = tarfile.SYMTYPE if path.is_symlink() else tarfile.DIRTYPE if path.is_dir() else tarfile.REGTYPE
        ours[rel] = (kind, st.st_mode & 0o7777, st.st_size if kind == tarfile.REGTYPE else 0,
                     os.readlink(path) if path.is_symlink() else "")
    engine_view = {k: v for k, v in engine_view.items() if v[0] in (tarfile.SYMTYPE, tarfile.DIRTYPE, tarfile.REGTYPE)}
    assert set(ours) == set(engine_view)
    assert {k: v for k, v in ours.items() if engine_view[k] != v} == {}
    environment = (tree / "etc" / "environment").read_text().splitlines()
    for item in image.attrs["Config"]["Env"]:
        assert item in environment
    assert "TINY_GREETING=hello" in environment
    assert "exec" in (tree / "etc" / "rc").read_text() and os.access(tree / "etc" / "rc", os.X_OK)


def test_doctor_says_slurm_answers_and_whether_the_base_dir_looks_shared(site):
    proc = _run(site, "doctor", check=False)
    assert "slurm: answers; partitions: debug, held" in proc.stdout
    assert "base dir shared:" in proc.stdout and "a local filesystem" in proc.stdout


def test_nodes_that_require_signatures_import_the_archive_submitted_with_sign(site, engine, tmp_path):
    key = tmp_path / "site.key"
    key_id = [e for e in _events(site.envmgr("--json", "key", "generate", str(key))) if e.get("event") == "done"][-1]
    strict = {"ENVMGR_TRUST_KEYS": f"{key}.pub", "ENVMGR_TRUST_REQUIRE_SIGNATURE": "true"}   # sbatch passes them on
    runs = site.base_dir / "runs" / NAME
    runs_before = set(runs.iterdir()) if runs.is_dir() else set()
    unsigned = _run(site, "run", NAME, "--on", "slurm", "--partition", "held", "--", "--steps=2", check=False, **strict)
    assert unsigned.returncode == 2 and "is not signed and [trust] require_signature is set" in unsigned.stderr
    assert "--sign KEY" in unsigned.stderr and len(error_lines(unsigned.stderr)) <= 2
    assert (set(runs.iterdir()) if runs.is_dir() else set()) == runs_before          # nothing was submitted

    proc = _run(site, "--json", "run", NAME, "--on", "slurm", "--partition", "held", "--sign", str(key),
                "--", "--steps=2", **strict)
    run_id = [e for e in _events(proc) if e.get("event") == "done"][-1]["run_id"]
    source = _record(site, run_id)["scheduler"]["image_source"]
    assert source["kind"] == "archive" and source["signed_by"] == key_id["key_id"]
    tag = _record(site, run_id)["image"]["tag"]
    for image in engine.images.list(REPO):            # the node lacks the image: it must import the signed archive
        engine.images.remove(image.id, force=True)
    _release_held_job(site, run_id)
    record = _record(site, run_id)
    out = (site.base_dir / "runs" / NAME / run_id / f"slurm-{record['scheduler']['job_id']}.out").read_text()
    assert record["status"] == "succeeded", (record, out)
    assert "importing" in out and engine.images.get(tag).id == record["image"]["id"]
    verified = _events(site.envmgr("--json", "verify", NAME, "--no-rebuild", **strict))
    assert [e for e in verified if e.get("event") == "done"][-1]["signature"]["key_id"] == source["signed_by"]
