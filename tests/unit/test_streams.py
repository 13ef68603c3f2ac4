"""stdout is data, stderr is talk (issue 24): a verb's steps, progress, warnings and status lines go to stderr;
stdout carries only its result (a table, the `--json` events, an SBOM). No engine: fake contexts and engines."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from envmgr.build.layer_bytes import with_layer_files
from envmgr.core.config import load_config
from envmgr.core.ui import Reporter
from envmgr.door.context import Context
from envmgr.images.image import ImageConfig, Layer, tarinfo

REPO = Path(__file__).resolve().parents[2]
SBOM = '{"bomFormat": "CycloneDX", "components": []}'


def _talk(ui: Reporter) -> None:
    ui.step("building tiny")
    ui.info("a detail")
    ui.warn("a warning")
    with ui.progress("writing layers", total=2e6, unit="bytes") as task:
        task.advance(1e6)
    ui.success("tiny: built", image="sha256:abc")


def test_plain_display_talks_on_stderr_only(capsys):
    _talk(Reporter("plain"))
    out, err = capsys.readouterr()
    assert out == ""
    assert "envmgr: building tiny" in err and "warning: a warning" in err and "done in" in err
    assert "envmgr: tiny: built" in err


def test_json_events_are_the_only_stdout_and_each_line_parses(capsys):
    _talk(Reporter("json"))
    out, err = capsys.readouterr()
    events = [json.loads(line) for line in out.splitlines()]
    assert [e["event"] for e in events] == ["step", "info", "warning", "progress-start", "progress-end", "done"]
    assert err == ""


def test_a_verb_whose_result_is_bytes_on_stdout_sends_even_json_events_to_stderr(capsys):
    ui = Reporter("json")
    ui.data_on_stdout()
    _talk(ui)
    out, err = capsys.readouterr()
    assert out == ""
    assert len([json.loads(line) for line in err.splitlines()]) == 6


def test_plain_progress_beats_while_the_step_lasts(capsys):
    ui = Reporter("plain")
    ui.heartbeat_s = 0.01
    said = io.StringIO()
    beat = threading.Event()

    def say(text: str) -> None:
        said.write(text + "\n")
        if "so far" in text:
            beat.set()

    ui._say = say   # type: ignore[method-assign]
    with ui.progress("reading 3 layer(s) back from the engine", total=None, unit="bytes") as task:
        task.advance(5e6)
        assert beat.wait(60), "no heartbeat line while the step ran"
    lines = said.getvalue().splitlines()
    assert any(line.startswith("  … reading 3 layer(s) back from the engine: 5.0 MB,") for line in lines), lines
    assert lines[-1].startswith("  done in ")
    assert all(t.name != "envmgr-heartbeat" for t in threading.enumerate())   # the beat ends with the step


def test_heartbeat_line_says_what_is_known():
    from envmgr.core.ui import heartbeat_line

    assert heartbeat_line("writing layers", 1.2e9, 5.4e9, "bytes", 30) == \
        "  … writing layers: 1200.0 MB of 5400.0 MB, 40.0 MB/s, 30 s so far"
    assert heartbeat_line("installing 120 distributions", 30, 120, "distributions", 12) == \
        "  … installing 120 distributions: 30 of 120 distributions, 2.50 distributions/s, 12 s so far"
    assert heartbeat_line("debootstrap bookworm", 0, None, "items", 61) == "  … debootstrap bookworm: 61 s so far"


class _SavingEngine:
    """A fake engine whose `docker save` stream holds the layers asked for."""

    def __init__(self, layers: list[bytes]):
        self.layers = layers

    def save_image(self, image_id: str):
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w") as tar:
            for data in self.layers:
                name = f"blobs/sha256/{hashlib.sha256(data).hexdigest()}"
                tar.addfile(tarinfo(name, tarfile.REGTYPE, 0o644, len(data)), io.BytesIO(data))
        yield out.getvalue()


def test_reading_layers_back_from_the_engine_talks_on_stderr(tmp_path, capsys):
    """The cold-cache SBOM path (issue 24's JSONDecodeError): its progress must not reach stdout."""
    data = [b"A" * 3000, b"B" * 5000]
    layers = [Layer(path=tmp_path / "nowhere" / str(i), diff_id="sha256:" + hashlib.sha256(d).hexdigest(),
                    size=len(d)) for i, d in enumerate(data)]
    config = load_config({"cache_dir": str(tmp_path / "cache")}, files=[])
    ctx = Context(config=config, ui=Reporter("plain"), _engine=_SavingEngine(data))  # type: ignore[arg-type]
    with with_layer_files(ctx, ImageConfig(layers=layers), "sha256:" + "0" * 64) as fetched:
        assert [layer.path.read_bytes() for layer in fetched.layers] == data
    out, err = capsys.readouterr()
    assert out == ""
    assert "reading 2 layer(s) back from the engine" in err and "done in" in err


def _fake_sbom(ctx, method, fmt):
    """What `sbom` does on a cold cache: says things (a step, progress, a warning), then gives the bytes."""
    _talk(ctx.ui)
    return "sha256:abc", SBOM.encode()


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_sbom_stdout_is_the_sbom_alone(monkeypatch, tmp_path, json_flag):
    from envmgr.build import sbom
    from envmgr.face.cli import app

    monkeypatch.setattr(sbom, "for_method", _fake_sbom)
    monkeypatch.setenv("ENVMGR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("ENVMGR_CONFIG", "/dev/null")
    result = CliRunner().invoke(app, [*json_flag, "sbom", "tiny"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == json.loads(SBOM)
    assert "building tiny" in result.stderr


def _envmgr(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENVMGR_")}
    env.update(ENVMGR_BASE_DIR=str(tmp_path / "base"), ENVMGR_CACHE_DIR=str(tmp_path / "cache"),
               ENVMGR_CONFIG="/dev/null", ENVMGR_ENGINE_URL="unix:///nonexistent/docker.sock")
    return subprocess.run([sys.executable, "-m", "envmgr", *args], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=300)


ENGINE_FREE = [("list",), ("show", "sd-demo"), ("lock", "sd-demo", "--check"), ("runs",), ("doctor",)]


@pytest.mark.parametrize("verb", ENGINE_FREE, ids=lambda v: "-".join(v))
def test_json_verbs_give_stdout_that_parses_on_a_cold_and_a_warm_cache(tmp_path, verb):
    for _ in ("cold", "warm"):
        proc = _envmgr(tmp_path, "--json", *verb)
        assert proc.stdout.strip(), proc.stderr
        for line in proc.stdout.splitlines():
            json.loads(line)


def _repository(tmp_path: Path) -> Path:
    source = tmp_path / "repository"
    source.mkdir()
    (source / "train.py").write_text("print('training')\n")
    (source / "requirements.txt").write_text("numpy==1.26.4\n")
    return source


def test_plain_verbs_whose_result_is_a_status_leave_stdout_empty(tmp_path):
    key = tmp_path / "k" / "signing.key"
    for args in (("lock", "sd-demo", "--check"), ("key", "generate", str(key)),
                 ("method", "add", str(_repository(tmp_path)), "--name", "third")):
        proc = _envmgr(tmp_path, *args)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == "" and proc.stderr.strip(), args


def test_json_verbs_that_write_files_give_stdout_that_parses(tmp_path):
    source = _repository(tmp_path)
    for name in ("third", "fourth"):   # a fresh base dir and cache, then a warm one
        added = _envmgr(tmp_path, "--json", "method", "add", str(source), "--name", name)
        assert [json.loads(line)["event"] for line in added.stdout.splitlines()] == ["done", "info"], added.stderr
    key = _envmgr(tmp_path, "--json", "key", "generate", str(tmp_path / "k" / "signing.key"))
    assert json.loads(key.stdout)["key_id"]


def test_version_names_the_commit_of_the_checkout(tmp_path):
    from envmgr import __version__
    from envmgr.core.version import describe

    said = _envmgr(tmp_path, "--version").stdout.strip()
    assert said.startswith(f"envmgr {__version__}")
    if (REPO / ".git").exists():
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True).stdout.strip()
        assert f"(commit {head}" in said
    assert said == describe()


def test_shell_completion_is_offered():
    script = Path(sys.executable).parent / "envmgr"
    if not script.is_file():
        pytest.skip("no envmgr script next to this python (`make install` writes one)")
    proc = subprocess.run([str(script), "--show-completion", "bash"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "SHELL": "/bin/bash"})
    assert proc.returncode == 0 and "complete " in proc.stdout and "_ENVMGR_COMPLETE" in proc.stdout, proc.stdout
