"""Lending the uv cache to a layered install (no engine): moved into the stage, always moved back, locked."""

from __future__ import annotations

import threading

import pytest

from envmgr.lock.uv_cache import LENT_NAME, lend_uv_cache, shared_uv_cache


def _cache(tmp_path):
    cache = tmp_path / "uv"
    (cache / "archive-v0" / "abc").mkdir(parents=True)
    (cache / "archive-v0" / "abc" / "mod.py").write_text("X = 1\n")
    stage = tmp_path / "envs" / "m-units-1"
    stage.mkdir(parents=True)
    return cache, stage


def test_lent_cache_is_in_the_stage_and_comes_back_even_when_the_step_fails(tmp_path):
    cache, stage = _cache(tmp_path)
    with pytest.raises(RuntimeError):
        with lend_uv_cache(tmp_path, stage) as lent:
            assert lent == LENT_NAME
            assert not cache.exists() and (stage / LENT_NAME / "archive-v0" / "abc" / "mod.py").is_file()
            raise RuntimeError("the step failed")
    assert (cache / "archive-v0" / "abc" / "mod.py").read_text() == "X = 1\n"
    assert not (stage / LENT_NAME).exists()


def test_a_cache_that_is_a_link_is_not_moved(tmp_path):
    real, stage = _cache(tmp_path)
    real.rename(tmp_path / "elsewhere")
    real.symlink_to(tmp_path / "elsewhere")
    with lend_uv_cache(tmp_path, stage) as lent:
        assert lent is None
        with shared_uv_cache(tmp_path):   # the step then takes it shared, as any other user: no deadlock
            pass
    assert real.is_symlink() and not (stage / LENT_NAME).exists()


def test_a_cache_left_in_a_killed_builds_stage_is_moved_back(tmp_path):
    cache, stage = _cache(tmp_path)
    cache.rename(stage / LENT_NAME)   # what a killed build leaves
    cache.mkdir()                     # and an empty cache made since
    with shared_uv_cache(tmp_path) as found:
        assert (found / "archive-v0" / "abc" / "mod.py").is_file()
    assert not (stage / LENT_NAME).exists()


def test_no_user_sees_the_cache_while_it_is_lent(tmp_path):
    cache, stage = _cache(tmp_path)
    seen: list[bool] = []
    lent_now, user_done = threading.Event(), threading.Event()

    def user() -> None:
        lent_now.wait()
        with shared_uv_cache(tmp_path) as found:
            seen.append((found / "archive-v0" / "abc" / "mod.py").is_file())
        user_done.set()

    thread = threading.Thread(target=user)
    thread.start()
    with lend_uv_cache(tmp_path, stage):
        lent_now.set()
        assert not user_done.wait(0.5)   # it waits for the cache to come back
    thread.join(5)
    assert seen == [True]
