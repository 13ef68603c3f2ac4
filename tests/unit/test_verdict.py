"""The honest verdict (envmgr/runs/verdict.py): which rule decides an exit 0, the read-only dataset hint,
the record and `runs show` line, and the same verdict for a pyxis Slurm job. Engine-free."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from envmgr.core.spec import MethodSpec
from envmgr.door.logs import uncaught_traceback
from envmgr.runs import records, slurm
from envmgr.runs.run import _failure
from envmgr.runs.verdict import LEGACY_DEFAULT, default_rule, describe, explicit_globs, judge, training_files

OLD_NS = 1_000_000_000_000_000_000   # 2001: a file from an earlier attempt

READ_ONLY_CRASH = """\
loading dataset
Traceback (most recent call last):
  File "/envmgr/run/method/train.py", line 12, in <module>
    main()
  File "/envmgr/run/method/train.py", line 9, in main
    open(os.path.join(dataset, "aspect_ratio_bucket_indices.json"), "w")
OSError: [Errno 30] Read-only file system: '/envmgr/data/pets/aspect_ratio_bucket_indices.json'
"""
DATASET = {"mode": "extracted", "mounted_at": "/envmgr/data/pets"}


def _added(tmp_path: Path, **extra) -> MethodSpec:
    """A spec as `envmgr method add` writes it."""
    spec = MethodSpec(name="m", entry=["bash", "train.sh"], **{"verdict": "training", **extra})
    spec.folder, spec.builtin = tmp_path, False
    return spec


def _builtin(tmp_path: Path, **extra) -> MethodSpec:
    spec = MethodSpec(name="m", entry=["python", "m.py"], **extra)
    spec.folder = tmp_path
    return spec


def _run(tmp_path: Path, log: str = "done\n") -> tuple[Path, Path]:
    run_dir = tmp_path / "run"
    (run_dir / "output").mkdir(parents=True)
    (run_dir / "log.txt").write_text(log + "# envmgr: container ended after 3.1 s\n")
    return run_dir, run_dir / "log.txt"


def _write(path: Path, data: bytes = b"w", old: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if old:
        os.utime(path, ns=(OLD_NS, OLD_NS))
    return path


# ---------------------------------------------------------------- which rule decides

def test_a_cache_file_and_a_traceback_after_exit_0_fail_by_the_traceback_rule(tmp_path):
    run_dir, log = _run(tmp_path, READ_ONLY_CRASH)
    started = time.time_ns()
    _write(run_dir / "output" / "cache" / "text" / "embeds.pt")     # SimpleTuner's cache, before it crashed
    _write(run_dir / "output" / "aspect_ratio_bucket_indices.json")
    verdict = judge(_added(tmp_path), run_dir, 0, started, log, dataset=DATASET)
    assert (verdict.status, verdict.rule, verdict.reason) == ("failed", "traceback", "uncaught traceback")
    assert "log ends in an uncaught traceback: OSError: [Errno 30] Read-only file system" in verdict.detail
    assert 'dataset_mode = "writable"' in (verdict.hint or "")
    recorded = verdict.fields()
    assert recorded["verdict"]["rule"] == "traceback" and recorded["reason"] == "uncaught traceback"


def test_caches_and_logs_are_not_training_output(tmp_path):
    run_dir, log = _run(tmp_path, "epoch 1\nsaved cache\n")
    started = time.time_ns()
    for name in ("cache/vae/img.pt", "text_embed_cache/a.safetensors", "logs/events.bin", ".cache/x.bin",
                 "runs/tb/events.pt", "train.log", "empty.safetensors"):
        _write(run_dir / "output" / name, b"" if name.startswith("empty") else b"w")
    _write(run_dir / "output" / "old.safetensors", old=True)             # an earlier attempt's
    (run_dir / "output" / "linked.safetensors").symlink_to(run_dir / "output" / "old.safetensors")
    verdict = judge(_added(tmp_path), run_dir, 0, started, log)
    assert (verdict.status, verdict.rule, verdict.reason) == ("failed", "training files", "no training outputs")
    assert "wrote no weights or checkpoint under output/" in verdict.detail and "success = " in (verdict.hint or "")


@pytest.mark.parametrize("written", ["output/pytorch_lora_weights.safetensors", "output/model.pt",
                                     "output/checkpoint-500/optimizer.state", "output/sub/adapter.gguf"])
def test_weights_or_a_checkpoint_written_by_this_attempt_succeed(tmp_path, written):
    run_dir, log = _run(tmp_path)
    started = time.time_ns()
    _write(run_dir / written)
    verdict = judge(_added(tmp_path), run_dir, 0, started, log)
    assert (verdict.status, verdict.rule) == ("succeeded", "training files")
    assert written in verdict.detail and training_files(run_dir / "output", started) == [written]


def test_the_old_method_add_default_counts_as_no_rule(tmp_path):
    old = _added(tmp_path, success=LEGACY_DEFAULT, verdict=None)    # written before `verdict` existed
    assert explicit_globs(old) is None and default_rule(old) == "training"
    run_dir, log = _run(tmp_path)
    started = time.time_ns()
    _write(run_dir / "output" / "cache.json")       # met `output/*` before: any file at all
    assert judge(old, run_dir, 0, started, log).rule == "training files"
    assert judge(old, run_dir, 0, started, log).status == "failed"
    assert explicit_globs(_builtin(tmp_path, success=["output/*"])) == ["output/*"], "a built-in's own rule"


def test_explicit_success_globs_keep_deciding_as_before(tmp_path):
    run_dir, log = _run(tmp_path, READ_ONLY_CRASH)
    started = time.time_ns()
    spec = _added(tmp_path, success=["output/result.json"])
    missing = judge(spec, run_dir, 0, started, log)
    assert (missing.status, missing.rule, missing.reason, missing.missing) == (
        "failed", "success", "no outputs", ("output/result.json",))
    _write(run_dir / "output" / "result.json")
    assert (judge(spec, run_dir, 0, started, log).status, judge(spec, run_dir, 0, started, log).rule) == (
        "succeeded", "success")


def test_a_hand_written_spec_without_globs_is_judged_by_its_exit_code(tmp_path):
    run_dir, log = _run(tmp_path, READ_ONLY_CRASH)
    verdict = judge(_builtin(tmp_path), run_dir, 0, time.time_ns(), log)
    assert (verdict.status, verdict.rule) == ("succeeded", "exit code")
    hand_written = _added(tmp_path, verdict=None)              # under <base_dir>/methods, written by hand
    assert default_rule(hand_written) == "exit-code"
    assert judge(hand_written, run_dir, 0, time.time_ns(), log).status == "succeeded"
    failed = judge(_builtin(tmp_path), run_dir, 2, time.time_ns(), log)
    assert (failed.status, failed.rule, failed.detail) == ("failed", "exit code", "exit 2")


def test_an_earlier_attempts_traceback_is_not_this_attempts_end(tmp_path):
    run_dir, log = _run(tmp_path, READ_ONLY_CRASH)
    start = log.stat().st_size
    with log.open("a") as fh:
        fh.write("resumed\n")
    started = time.time_ns()
    _write(run_dir / "output" / "lora.safetensors")
    assert judge(_added(tmp_path), run_dir, 0, started, log, start).status == "succeeded"
    assert judge(_added(tmp_path), run_dir, 0, started, log, log.stat().st_size).status == "succeeded"


# ---------------------------------------------------------------- tracebacks

def _lines(text: str) -> list[str]:
    return text.splitlines()


def test_an_uncaught_traceback_is_found_at_the_end():
    assert uncaught_traceback(_lines(READ_ONLY_CRASH)).startswith("OSError: [Errno 30]")
    chained = ("Traceback (most recent call last):\n  File \"a.py\", line 1, in <module>\n    x()\n"
               "KeyError: 'a'\n\nDuring handling of the above exception, another exception occurred:\n\n"
               "Traceback (most recent call last):\n  File \"a.py\", line 3, in <module>\n    y()\n"
               "    ^^^\nRuntimeError: second\n\n")
    assert uncaught_traceback(_lines(chained)) == "RuntimeError: second"
    syntax = ("Traceback (most recent call last):\n  File \"t.py\", line 1\n    f(\n     ^\n"
              "SyntaxError: '(' never closed")
    assert uncaught_traceback(_lines(syntax)) == "SyntaxError: '(' never closed"
    bare = "Traceback (most recent call last):\n  File \"t.py\", line 1, in <module>\nKeyboardInterrupt"
    assert uncaught_traceback(_lines(bare)) == "KeyboardInterrupt"


def test_a_rank_prefix_and_a_bar_before_the_traceback_are_read_through():
    ranked = "\n".join(f"[rank0]: {line}" for line in _lines(READ_ONLY_CRASH))
    assert uncaught_traceback(_lines(ranked)).startswith("OSError: [Errno 30]")
    bar = " 40%|####      | 4/10 [00:01<00:02]" + READ_ONLY_CRASH
    assert uncaught_traceback(_lines(bar)).startswith("OSError: [Errno 30]")


@pytest.mark.parametrize("text", [
    READ_ONLY_CRASH + "retrying without the bucket cache\nsaved lora\n",          # caught, logged, went on
    "Exception ignored in: <function Pool.__del__>\n" + READ_ONLY_CRASH.split("\n", 1)[1],
    "Exception in thread Thread-1 (upload):\n" + READ_ONLY_CRASH.split("\n", 1)[1],
    "Traceback (most recent call last): the trainer crashed, the launcher does not care\ndone\n",
    "Traceback (most recent call last):\nValueError: no frames\n",
    "all good\n",
])
def test_what_is_not_an_uncaught_traceback_at_the_end(text):
    assert uncaught_traceback(_lines(text)) is None


# ---------------------------------------------------------------- the read-only dataset hint

def test_a_failed_run_that_wrote_under_its_read_only_dataset_is_told_to_make_it_writable(tmp_path):
    run_dir, log = _run(tmp_path, READ_ONLY_CRASH)
    verdict = judge(_added(tmp_path), run_dir, 1, time.time_ns(), log, dataset=DATASET)
    assert (verdict.status, verdict.rule) == ("failed", "exit code")
    assert 'dataset_mode = "writable"' in verdict.hint and "/envmgr/data/pets" in verdict.hint
    denied = "PermissionError: [Errno 13] Permission denied: '/envmgr/data/pets/cache'\n"
    run_dir2, log2 = _run(tmp_path / "b", denied)
    assert 'dataset_mode = "writable"' in judge(_added(tmp_path), run_dir2, 1, 0, log2, dataset=DATASET).hint


@pytest.mark.parametrize("log, dataset", [
    (READ_ONLY_CRASH, {"mode": "writable", "mounted_at": "/envmgr/data/pets"}),      # already writable
    (READ_ONLY_CRASH.replace("/envmgr/data/pets", "/opt/envmgr/method"), DATASET),    # not the dataset
    (READ_ONLY_CRASH, None),                                                          # no dataset
    (READ_ONLY_CRASH.replace("/envmgr/data/pets/", "/envmgr/data/pets2/"), DATASET),  # another folder
])
def test_no_dataset_hint_where_it_would_not_help(tmp_path, log, dataset):
    run_dir, path = _run(tmp_path, log)
    assert judge(_added(tmp_path), run_dir, 1, 0, path, dataset=dataset).hint is None


# ---------------------------------------------------------------- messages and records

def test_the_failure_message_and_runs_show_name_the_rule(tmp_path):
    run_dir, log = _run(tmp_path, READ_ONLY_CRASH)
    verdict = judge(_added(tmp_path), run_dir, 0, time.time_ns(), log, dataset=DATASET)
    record = {"run_id": "20261206-100000-abcd", "status": "failed", "exit_code": 0, **verdict.fields()}
    error = _failure(record["run_id"], run_dir, record, READ_ONLY_CRASH.splitlines()[-2:])
    assert "failed (uncaught traceback)" in error.message and "(rule: traceback)" in error.message
    assert 'dataset_mode = "writable"' in error.hint
    assert describe(record).startswith("verdict: failed — exit 0 but the log ends in an uncaught traceback: OSError")
    assert describe(record).endswith("(rule: traceback)")
    old = {"status": "failed", "reason": "no outputs", "missing_outputs": ["output/*"], "exit_code": 0}
    assert describe(old) == "verdict: failed — exit 0 but it wrote nothing that matches output/* (rule: success)"
    assert describe({"status": "failed", "exit_code": 3}) == "verdict: failed — exit 3 (rule: exit code)"


def test_a_pyxis_job_gets_the_same_verdict(tmp_path):
    base = tmp_path / "base"
    method = base / "methods" / "m"
    method.mkdir(parents=True)
    (method / "envmgr.toml").write_text('name = "m"\nentry = ["bash", "train.sh"]\nsuccess = ["output/*"]\n')
    run_dir = base / "runs" / "m" / "20261206-100000-abcd"
    (run_dir / "output").mkdir(parents=True)
    (run_dir / "log.txt").write_text(READ_ONLY_CRASH)
    _write(run_dir / "output" / "cache" / "x.pt")
    record = {"run_id": run_dir.name, "method": "m", "status": "running", "dataset": DATASET,
              "scheduler": {"kind": "slurm", "runtime": "pyxis", "submitted": "2026-01-01T00:00:00+00:00"},
              "attempts": [{"started": None, "ended": None, "status": "running"}]}
    records.write_record(run_dir, record)
    slurm.finish(run_dir, 0)
    done = json.loads((run_dir / "run.json").read_text())
    assert (done["status"], done["reason"], done["verdict"]["rule"]) == ("failed", "uncaught traceback", "traceback")
    assert done["attempts"][-1]["status"] == "failed"


def test_sd_demo_is_judged_by_its_own_success_glob(tmp_path):
    from envmgr.core.spec import find_method

    spec = find_method("sd-demo", tmp_path / "base")
    assert spec.builtin and explicit_globs(spec) == ["output/pytorch_lora_weights.safetensors"]
    run_dir, log = _run(tmp_path, "step 10/10 loss 0.1\nsaved\n")
    started = time.time_ns()
    _write(run_dir / "output" / "checkpoint-10" / "model.safetensors")
    assert (judge(spec, run_dir, 0, started, log).status, judge(spec, run_dir, 0, started, log).rule) == (
        "failed", "success")
    _write(run_dir / "output" / "pytorch_lora_weights.safetensors")
    assert (judge(spec, run_dir, 0, started, log).status, judge(spec, run_dir, 0, started, log).rule) == (
        "succeeded", "success")


def test_the_verdict_key_leaves_the_image_hash_as_it_was(tmp_path):
    plain = _builtin(tmp_path)
    assert _builtin(tmp_path, verdict="training").spec_hash() == plain.spec_hash()


def test_a_script_of_the_methods_own_package_that_misses_its_package_is_told_python_m(tmp_path):
    from envmgr.runs.verdict import entry_hint

    (tmp_path / "tuner" / "helpers").mkdir(parents=True)
    for name in ("tuner/__init__.py", "tuner/helpers/__init__.py", "tuner/train.py"):
        (tmp_path / name).write_text("")
    tail = ["Traceback (most recent call last):", '  File "/envmgr/run/method/tuner/train.py", line 20, in <module>',
            "    from tuner.helpers import log_format", "ModuleNotFoundError: No module named 'tuner'"]
    hint = entry_hint(tail, ["python", "tuner/train.py"], tmp_path)
    assert hint and 'entry = ["python", "-m", "tuner.train"]' in hint
    assert entry_hint(tail, ["python", "-m", "tuner.train"], tmp_path) is None
    other = tail[:-1] + ["ModuleNotFoundError: No module named 'numpy'"]   # a dependency: not the entry's fault
    assert entry_hint(other, ["python", "tuner/train.py"], tmp_path) is None
