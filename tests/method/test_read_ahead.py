"""The data path off the step: batches read ahead, the cache held in memory when it fits, buffered logging."""

from __future__ import annotations

import io
import json
import threading

import pytest
import torch
from conftest import textfile_dataset, write_trainer_config
from sd_trainer import data, events, metrics
from test_cache import build

# ---------------------------------------------------------------- ReadAhead


class Recorder:
    """prepare(key) -> key * 10, remembering which thread prepared what; fails on `failing`."""

    def __init__(self, failing=None):
        self.prepared: list[int] = []
        self.threads: set[int] = set()
        self.failing = failing

    def __call__(self, key: int) -> int:
        self.threads.add(threading.get_ident())
        self.prepared.append(key)
        if key == self.failing:
            raise data.DataError(f"latent cache file for {key} vanished")
        return key * 10


def test_batches_come_in_order_from_a_background_thread_at_most_depth_ahead():
    recorder = Recorder()
    reader = data.ReadAhead(recorder, range(1, 101), depth=3)
    try:
        assert reader.get(1) == 10
        reader._thread.join(timeout=0.5)  # let it run ahead as far as it may
        assert len(recorder.prepared) <= 3  # the one handed over keeps its slot until resume()
        reader.resume()
        reader._thread.join(timeout=0.5)
        assert len(recorder.prepared) <= 1 + 3
        assert [reader.get(key) for key in range(2, 101)] == [key * 10 for key in range(2, 101)]
        assert recorder.prepared == list(range(1, 101))
        assert threading.get_ident() not in recorder.threads
    finally:
        reader.close()
    assert not reader._thread.is_alive()


def test_depth_zero_prepares_each_batch_when_asked_on_the_callers_thread():
    recorder = Recorder()
    reader = data.ReadAhead(recorder, range(1, 5), depth=0)
    assert recorder.prepared == []
    assert reader.get(1) == 10 and recorder.prepared == [1]
    assert recorder.threads == {threading.get_ident()}
    reader.close()


def test_an_error_reaches_the_step_that_needs_that_batch():
    reader = data.ReadAhead(Recorder(failing=3), range(1, 10), depth=4)
    try:
        assert reader.get(1) == 10 and reader.get(2) == 20
        with pytest.raises(data.DataError, match="for 3 vanished"):
            reader.get(3)
    finally:
        reader.close()


def test_asking_out_of_order_is_refused():
    reader = data.ReadAhead(Recorder(), range(1, 10), depth=2)
    try:
        with pytest.raises(RuntimeError, match="out of order"):
            reader.get(2)
    finally:
        reader.close()


def test_close_stops_a_worker_blocked_on_a_full_queue():
    reader = data.ReadAhead(Recorder(), range(1, 1000), depth=1)
    reader.get(1)
    reader.close()
    assert not reader._thread.is_alive()


# ---------------------------------------------------------------- the cache in memory


def test_latents_and_embeddings_stay_in_memory_when_they_fit_the_budget(tmp_path, tiny_model):
    images = textfile_dataset(tmp_path / "images", count=3)
    training_set = build(write_trainer_config(tmp_path / "run", tiny_model, images))
    size = training_set.hold_in_memory(budget_mb=64)
    assert size == sum(path.stat().st_size for path in {*training_set.latent_files, *training_set.embeddings.paths})
    first = training_set.latents(torch.tensor([0, 1, 2]))
    embeds, pooled = training_set.prompt_embeddings(torch.tensor([1, 2, 3]))
    for path in (tmp_path / "run" / "cache").rglob("*.safetensors"):  # read once: the files are no longer needed
        path.unlink()
    assert torch.equal(training_set.latents(torch.tensor([0, 1, 2])), first)
    again = training_set.prompt_embeddings(torch.tensor([1, 2, 3]))
    assert torch.equal(again[0], embeds) and torch.equal(again[1], pooled)


def test_over_the_budget_every_batch_reads_its_files(tmp_path, tiny_model):
    images = textfile_dataset(tmp_path / "images", count=2)
    training_set = build(write_trainer_config(tmp_path / "run", tiny_model, images))
    assert training_set.hold_in_memory(budget_mb=0) is None
    training_set.latents(torch.tensor([0]))
    training_set.latent_files[0].unlink()
    with pytest.raises(data.DataError, match="vanished"):
        training_set.latents(torch.tensor([0]))


# ---------------------------------------------------------------- logging off the step


def test_metrics_are_written_in_batches_and_on_flush(tmp_path):
    log = metrics.MetricsLog(tmp_path / "metrics.jsonl")
    for step in range(1, 4):
        log.append({"step": step, "loss": 0.5})
    assert (tmp_path / "metrics.jsonl").read_text() == ""  # nothing written on the step
    log.flush()
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    for step in range(4, 4 + log.FLUSH_RECORDS):
        log.append({"step": step, "loss": 0.5})
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3 + log.FLUSH_RECORDS
    log.append({"step": 999, "loss": 0.5})
    assert log.records()[-1]["step"] == 999  # records() writes what is pending first


class CountingStdout(io.StringIO):
    def __init__(self):
        super().__init__()
        self.flushes = 0

    def flush(self):
        self.flushes += 1


def test_progress_events_are_not_flushed_line_by_line_other_events_are(monkeypatch):
    stdout = CountingStdout()
    monkeypatch.setattr("sys.stdout", stdout)
    monkeypatch.setattr(events, "_flushed", float("-inf"))
    for step in range(1, 201):
        events.emit("progress", step=step, max_steps=200, loss=0.1, lr=1e-4, s_per_step=0.001)
    assert 1 <= stdout.flushes < 20  # the first at once, then at most every PROGRESS_FLUSH_S
    assert len(stdout.getvalue().splitlines()) == 200
    before = stdout.flushes
    events.emit("checkpoint", step=200, path="/x")
    assert stdout.flushes == before + 1
