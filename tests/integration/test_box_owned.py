"""A hostile method against the trees it owns, with the real engine: it swaps its writable dataset copy for a
link between a run and its resume, and it leaves setuid files, links, a FIFO and a socket in output/.
Resume refuses (recorded as failed), and nothing but real files and folders is reported as an output."""

from __future__ import annotations

import json
import os
import stat
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine

OWNED_MAIN = r'''
import os, socket, sys
mode = next((a for a in sys.argv[1:] if not a.startswith("--")), "leave")
run, out = "/envmgr/run", "/envmgr/run/output"
data = os.environ.get("ENVMGR_DATASET_PATH", "")
print("dataset holds", sorted(os.listdir(data)) if os.path.isdir(data) else None, flush=True)
if os.path.exists(os.path.join(data, "etc", "hostname")):
    print("SAW-HOST-ROOT", open(os.path.join(data, "etc", "hostname")).read().strip(), flush=True)
if "--resume" in sys.argv:
    open(out + "/resumed.txt", "w").write("resumed\n")
elif mode == "swap-dataset":
    # the writable copy is work/dataset/<name>: keep work/dataset a real folder, make <name> a link to /
    name = os.path.basename(data)
    os.rename(run + "/dataset", run + "/dataset.old")
    os.mkdir(run + "/dataset")
    os.symlink("/", run + "/dataset/" + name)
elif mode == "swap-dataset-root":
    os.rename(run + "/dataset", run + "/dataset.old")
    os.symlink("/", run + "/dataset")
elif mode == "leave":
    os.umask(0o077)
    open(out + "/lora.safetensors", "w").write("weights\n")          # 0600, like torch.save
    for name, bits in (("suid-tool", 0o4755), ("sgid-tool", 0o2755), ("everyone-writes", 0o666)):
        open(out + "/" + name, "w").write("#!/bin/sh\nid\n")
        os.chmod(out + "/" + name, bits)
    os.symlink("/etc/shadow", out + "/stolen.safetensors")
    os.symlink("/etc", out + "/checkpoint-9")
    os.mkdir(out + "/checkpoint-1")
    open(out + "/checkpoint-1/model.bin", "w").write("x")
    os.mkdir(out + "/validation_images")
    open(out + "/validation_images/ok.png", "w").write("png")
    os.symlink("/etc/passwd", out + "/validation_images/leak.png")
    os.mkfifo(out + "/pipe")
    socket.socket(socket.AF_UNIX).bind(out + "/sock")
    os.link(out + "/lora.safetensors", out + "/lora-again.safetensors")   # a hard link inside output/ is fine
print("done", mode, flush=True)
'''

OWNED_SPEC = """\
name = "tiny"
description = "hostile fixture method: it owns work/ and output/"
backend = "poetry"
entry = ["python", "main.py"]
gpu = "none"
platform_args = false
workdir = "run"
dataset_mode = "writable"
"""


@pytest.fixture
def owned_method(workspace, mirror_a, tmp_path):
    (workspace.method_dir / "main.py").write_text(OWNED_MAIN)
    (workspace.method_dir / "envmgr.toml").write_text(OWNED_SPEC)
    datasets = workspace.base_dir / "datasets"
    datasets.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(datasets / "pets.zip", "w") as zf:
        zf.writestr("a.txt", "a")
        zf.writestr("b.txt", "b")
    workspace.envmgr("lock", "tiny", mirror=mirror_a.url)
    workspace.envmgr("build", "tiny", mirror=mirror_a.url)
    return workspace


def _run_dir(proc) -> Path:
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return Path([e for e in events if e.get("run_dir")][-1]["run_dir"])


def _tree(root: Path) -> dict[str, tuple[int, int, int]]:
    return {str(p): (p.lstat().st_mode, p.lstat().st_size, p.lstat().st_mtime_ns) for p in root.rglob("*")}


@pytest.mark.parametrize("swap", ["swap-dataset", "swap-dataset-root"])
def test_a_dataset_copy_swapped_for_a_link_is_refused_on_resume(owned_method, engine, swap):
    ws = owned_method
    ran = ws.envmgr("--json", "run", "tiny", "--dataset", "pets.zip", "--", swap)
    run_dir = _run_dir(ran)
    assert (run_dir / "work" / "dataset" / "pets").is_symlink() or (run_dir / "work" / "dataset").is_symlink()
    outside = {str(p): _tree(p) for p in (ws.base_dir / "methods", ws.base_dir / "datasets")}
    again = ws.envmgr("--json", "run", "tiny", "--resume", run_dir.name, check=False)
    assert again.returncode == 2, again.stdout + again.stderr
    said = again.stdout + again.stderr
    assert "symbolic link" in said and "will not use it" in said, said
    log = (run_dir / "log.txt").read_text()
    assert "SAW-HOST-ROOT" not in log + said, "the resumed method saw the host's /"
    assert not (run_dir / "output" / "resumed.txt").exists(), "the method was started"
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "failed" and record["reason"].startswith("refused:"), record
    assert record["attempts"][-1]["status"] == "failed" and len(record["attempts"]) == 2
    assert "refused to start" in log
    assert {str(p): _tree(p) for p in (ws.base_dir / "methods", ws.base_dir / "datasets")} == outside
    assert not engine.containers.list(all=True, filters={"label": f"org.envmgr.run-id={run_dir.name}"})


def test_outputs_are_inspected_before_they_are_reported_and_handed_to_the_invoker(owned_method, engine):
    ws = owned_method
    shadow = Path("/etc/shadow").stat()
    ran = ws.envmgr("--json", "run", "tiny", "--", "leave")
    run_dir = _run_dir(ran)
    output = run_dir / "output"
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "succeeded", record
    artifacts = record["artifacts"]
    assert artifacts["lora"] == ["output/lora-again.safetensors", "output/lora.safetensors"]
    assert artifacts["checkpoints"] == ["output/checkpoint-1"]
    assert artifacts["validation_images"] == ["output/validation_images/ok.png"]
    refused = {r["path"]: r["reason"] for r in record["refused_outputs"]}
    assert set(refused) == {"output/stolen.safetensors", "output/checkpoint-9", "output/validation_images/leak.png",
                            "output/pipe", "output/sock"}, refused
    assert "/etc/shadow" in refused["output/stolen.safetensors"] and "FIFO" in refused["output/pipe"]
    assert refused["output/sock"] == "a socket"
    # left where they are, never followed or changed
    assert os.readlink(output / "stolen.safetensors") == "/etc/shadow"
    assert Path("/etc/shadow").stat() == shadow
    for name in ("suid-tool", "sgid-tool", "everyone-writes"):
        assert stat.S_IMODE((output / name).stat().st_mode) & 0o6002 == 0, name
    assert {c["path"] for c in record["changed_outputs"]} == {"output/suid-tool", "output/sgid-tool",
                                                              "output/everyone-writes"}
    # root ran envmgr without sudo (the method ran as nobody): every output is readable by everyone
    lora = (output / "lora.safetensors").stat()
    assert lora.st_uid == 65534 and stat.S_IMODE(lora.st_mode) & 0o444 == 0o444
    assert stat.S_IMODE(output.stat().st_mode) & 0o555 == 0o555
    log = (run_dir / "log.txt").read_text()
    assert "output/stolen.safetensors is not listed as an output" in log and "setuid dropped" in log

    # under sudo, with --as-root: the root-owned outputs are handed to SUDO_UID:SUDO_GID
    ran = ws.envmgr("--json", "run", "tiny", "--as-root", "--", "leave", SUDO_UID="4321", SUDO_GID="4322")
    output = _run_dir(ran) / "output"
    lora = (output / "lora.safetensors").stat()
    assert (lora.st_uid, lora.st_gid) == (4321, 4322) and stat.S_IMODE(lora.st_mode) & 0o400
    assert (output.stat().st_uid, output.stat().st_gid) == (4321, 4322)
    assert os.lstat(output / "stolen.safetensors").st_uid == 0     # a link is not handed over either

    # a dataset zip holding `a` and `a/b`: one line, exit 2, and no run dir without its run.json
    with zipfile.ZipFile(ws.base_dir / "datasets" / "clash.zip", "w") as zf:
        zf.writestr("a", "file")
        zf.writestr("a/b", "under it")
    runs = sorted((ws.base_dir / "runs" / "tiny").iterdir())
    clash = ws.envmgr("run", "tiny", "--dataset", "clash.zip", "--", "leave", check=False)
    assert clash.returncode == 2 and "both a file and a folder" in clash.stderr, clash.stderr
    assert "internal error" not in clash.stderr
    assert sorted((ws.base_dir / "runs" / "tiny").iterdir()) == runs
