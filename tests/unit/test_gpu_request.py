"""`--gpus` parsing: one parser for every verb, a clear one-line error for bad input."""

import pytest

from envmgr.core.errors import Exit, UsageError
from envmgr.core.gpu import GpuRequest, parse_gpus


@pytest.mark.parametrize("text, expected", [
    ("all", GpuRequest(kind="all")),
    (" ALL ", GpuRequest(kind="all")),
    ("none", GpuRequest(kind="none")),
    ("1", GpuRequest(kind="count", count=1)),
    ("8", GpuRequest(kind="count", count=8)),
    ("0,1", GpuRequest(kind="indices", indices=(0, 1))),
    ("3, 1", GpuRequest(kind="indices", indices=(3, 1))),
    ("0,", GpuRequest(kind="indices", indices=(0,))),
])
def test_parse_gpus_accepts(text, expected):
    assert parse_gpus(text) == expected


@pytest.mark.parametrize("text, says", [
    ("0", "--gpus none"),
    ("-1", "expected all, none"),
    ("0,0", "twice"),
    ("abc", "expected all, none"),
    (" ", "empty"),
    ("", "empty"),
    ("1,,2", "expected all, none"),
    ("1.5", "expected all, none"),
    (",", "expected all, none"),
    ("0,-1", "expected all, none"),
])
def test_parse_gpus_rejects_with_what_is_accepted(text, says):
    with pytest.raises(UsageError) as err:
        parse_gpus(text)
    assert says in str(err.value)
    assert err.value.exit_code == Exit.USAGE
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("text, env", [("all", "all"), ("none", "none"), ("2", "2"), ("1,0", "1,0"), ("4,", "4")])
def test_env_value_is_what_was_asked(text, env):
    assert parse_gpus(text).env_value() == env


@pytest.mark.parametrize("text, visible, processes", [
    ("all", 4, 4), ("all", None, None), ("all", 0, None), ("none", 4, 1),
    ("2", 8, 2), ("0,3,5", 8, 3),
])
def test_process_count(text, visible, processes):
    assert parse_gpus(text).process_count(visible) == processes


def test_request_is_frozen():
    request = parse_gpus("all")
    with pytest.raises(AttributeError):
        request.kind = "none"  # type: ignore[misc]
