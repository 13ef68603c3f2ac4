"""The conda backend without an engine or a network: environment.yml, lock entries, mirrors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from envmgr.core.config import MirrorsConfig
from envmgr.core.errors import StaleLockError, UsageError
from envmgr.core.spec import MethodSpec, load_spec
from envmgr.door.mirrors import conda_channel_mirrors
from envmgr.lock.backends import entry_command, get_backend
from envmgr.lock.backends.conda import CondaBackend, _locked_pip, _normalize_prefix, _record, read_environment

REPO = Path(__file__).resolve().parents[2]


def _env(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "environment.yml"
    path.write_text(text)
    return path


def test_environment_yml_channels_conda_and_pip(tmp_path):
    env = read_environment(_env(tmp_path, "name: x\nchannels:\n  - conda-forge\ndependencies:\n  - python 3.11.*\n"
                                          "  - numpy=1.26\n  - pip:\n    - requests==2.31\n"))
    assert env.channels == ["conda-forge"]
    assert env.conda == ["python 3.11.*", "numpy=1.26"]
    assert env.pip == ["requests==2.31"]


@pytest.mark.parametrize("text, line, words", [
    ("channels: [a]\ndependencies:\n  - x\n  - [oops\n", 5, "not valid YAML"),
    ("channels: [a]\ndependencies:\n  - x\n  - numpy >>>1\n", 4, "numpy >>>1"),
    ("channels: [a]\ndependencies:\n  - x\nvariables: {A: 1}\n", 4, "'variables' is not supported"),
    ("channels: [a]\ndependencies:\n  - x\n  - conda: [y]\n", 4, "pip: [...]"),
    ("channels: [a]\ndependencies:\n  - x\n  - pip:\n    - requests\n", 3, "needs `python`"),
    ("channels: a\ndependencies: [x]\n", 1, "must be a list"),
])
def test_malformed_environment_yml_names_the_line(tmp_path, text, line, words):
    path = _env(tmp_path, text)
    with pytest.raises(UsageError) as err:
        read_environment(path)
    assert err.value.message.startswith(f"{path}:{line}: ") and words in err.value.message


def test_missing_channels_or_file(tmp_path):
    with pytest.raises(UsageError, match="no `channels`"):
        read_environment(_env(tmp_path, "dependencies: [x]\n"))
    with pytest.raises(UsageError, match="missing"):
        read_environment(tmp_path / "nope.yml")


def _spec(tmp_path: Path, extra: str = "") -> MethodSpec:
    folder = tmp_path / "m"
    folder.mkdir(exist_ok=True)
    (folder / "envmgr.toml").write_text(f'name = "m"\nbackend = "conda"\nentry = ["python", "x.py"]\n{extra}')
    (folder / "environment.yml").write_text("channels: [c]\ndependencies: [python 3.11.*]\n")
    return load_spec(folder / "envmgr.toml", builtin=False)


def test_spec_platforms_and_virtual_packages_default_so_old_specs_load(tmp_path):
    spec = _spec(tmp_path)
    assert spec.lock_platforms == ["linux-64"] and spec.virtual_packages == {}
    gpu = _spec(tmp_path, 'platforms = ["linux-aarch64"]\n[virtual_packages]\n__cuda = "12.4"\n')
    assert gpu.lock_platforms == ["linux-64", "linux-aarch64"]
    assert CondaBackend.virtual_packages(gpu, "linux-64")["__cuda"] == "12.4"
    assert CondaBackend.virtual_packages(gpu, "linux-64")["__glibc"] == "2.36"
    with pytest.raises(UsageError, match="virtual package names start with '__'"):
        _spec(tmp_path, '[virtual_packages]\ncuda = "12"\n')


def test_content_hash_follows_what_is_solved_not_where(tmp_path):
    backend = CondaBackend()
    spec = _spec(tmp_path)
    env = backend.environment(spec)
    first = backend.content_hash(env, spec, "linux-64")
    assert backend.content_hash(env, spec, "linux-aarch64") != first
    cuda = _spec(tmp_path, '[virtual_packages]\n__cuda = "12.4"\n')
    assert backend.content_hash(env, cuda, "linux-64") != first


def test_backend_is_registered_and_entry_goes_through_conda_run(tmp_path):
    spec = _spec(tmp_path)
    assert isinstance(get_backend(spec), CondaBackend)
    assert entry_command(spec, ["python", "x.py"]) == ["conda", "run", "-n", "m", "--no-capture-output",
                                                       "python", "x.py"]
    poetry = spec.model_copy(update={"backend": "poetry"})
    assert entry_command(poetry, ["python", "x.py"]) == ["python", "x.py"]


def test_missing_lock_is_stale(tmp_path):
    with pytest.raises(StaleLockError, match="no conda-lock.yml"):
        CondaBackend().check(_spec(tmp_path))


def test_committed_example_lock_round_trips_into_installable_records():
    spec = load_spec(REPO / "envs" / "conda-demo" / "envmgr.toml")
    backend = CondaBackend()
    backend.check(spec)
    conda, pip = backend.locked(spec, "linux-64")
    records = {r.name.normalized: r for r in map(_record, conda)}
    hello = records["hello-tool"]
    assert hello.subdir == "linux-64" and hello.file_name.endswith(".conda")
    assert list(hello.depends) == ["greet-data >=1.0"]
    assert hello.channel.rstrip("/").endswith("/envmgr-fixtures")
    assert records["greet-data"].subdir == "noarch"
    assert {p.name for p in pip} == {"envmgr-alpha", "envmgr-beta"}


def test_pip_entry_takes_the_best_wheel_for_the_target(tmp_path):
    spec = _spec(tmp_path)
    sha = {name: f"{i:064x}" for i, name in enumerate(["win", "many", "musl", "old", "sdist"])}
    package = {"name": "Fast_Lib", "version": "2.0", "wheels": [
        {"url": "http://mirror/f/fast_lib-2.0-cp311-cp311-win_amd64.whl", "hashes": {"sha256": sha["win"]}},
        {"url": "http://mirror/f/fast_lib-2.0-cp311-cp311-musllinux_1_2_x86_64.whl",
         "hashes": {"sha256": sha["musl"]}},
        {"url": "http://mirror/f/fast_lib-2.0-cp311-cp311-manylinux_2_17_x86_64.whl", "hashes": {"sha256": sha["old"]}},
        {"url": "http://mirror/f/fast_lib-2.0-cp311-cp311-manylinux_2_28_x86_64.whl", "hashes": {"sha256": sha["many"]}},
    ], "sdist": {"url": "http://mirror/f/fast_lib-2.0.tar.gz", "hashes": {"sha256": sha["sdist"]}}}
    entry = _locked_pip(package, "linux-64", "3.11.2", spec)
    assert entry.name == "fast-lib" and entry.hash.sha256 == sha["many"]
    assert "mirror" not in entry.url and entry.url.endswith("/fast_lib-2.0-cp311-cp311-manylinux_2_28_x86_64.whl")
    aarch = _locked_pip(package, "linux-aarch64", "3.11.2", spec)
    assert aarch.hash.sha256 == sha["sdist"] and aarch.url.endswith("/fast_lib-2.0.tar.gz")


def test_channel_mirrors_map_canonical_channels_and_expand_variables(monkeypatch):
    monkeypatch.setenv("CHANNEL_TOKEN", "t0ken")
    mirrors = MirrorsConfig(channels={"conda-forge": "http://u:${CHANNEL_TOKEN}@127.0.0.1:9/cf/",
                                      "http://127.0.0.1:8/own": "http://127.0.0.1:9/own"})
    found = conda_channel_mirrors(mirrors)
    assert found["http://127.0.0.1:8/own"] == "http://127.0.0.1:9/own"
    forge = [mirror for canonical, mirror in found.items() if canonical.endswith("/conda-forge")]
    assert forge == ["http://u:t0ken@127.0.0.1:9/cf"]


def test_normalized_prefix_keeps_no_host_paths(tmp_path):
    meta = tmp_path / "conda-meta"
    meta.mkdir()
    (tmp_path / "CACHEDIR.TAG").write_text("x")
    (tmp_path / ".lock").write_text("")
    (meta / "a-1-0.json").write_text(json.dumps({"name": "a", "extracted_package_dir": "/host/cache/a",
                                                  "link": {"source": "/host/cache/a", "type": 1}}))
    _normalize_prefix(tmp_path)
    assert json.loads((meta / "a-1-0.json").read_text()) == {"name": "a"}
    assert not (tmp_path / "CACHEDIR.TAG").exists() and not (tmp_path / ".lock").exists()
