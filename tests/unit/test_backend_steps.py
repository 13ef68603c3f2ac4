"""Each backend's container steps, described and handed to a fake step runner: no engine, no network."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from envmgr.core import paths
from envmgr.core.config import load_config
from envmgr.core.errors import EnvmgrError, MirrorError
from envmgr.core.spec import MethodSpec, load_spec
from envmgr.core.ui import Reporter
from envmgr.door.containers import ContainerResult
from envmgr.door.context import Context
from envmgr.door.steps import Step, run_in_container
from envmgr.images.base import BaseImage
from envmgr.lock.backends import get_backend
from envmgr.lock.backends.poetry import POETRY_VERSION, PYPI_MIRROR_PLUGIN_VERSION, TOOLS_BYTECODE, PoetryBackend

REPO = Path(__file__).resolve().parents[2]
BASE = BaseImage(name="bookworm-py311", image_id="sha256:" + "b" * 64, diff_id="sha256:" + "d" * 64,
                 layer_path="/nonexistent", python="/usr/bin/python3.11", python_version="3.11.2", packages={})


class FakeRunner:
    """Records every step; `answer` plays the container: it may write into the step's mounts."""

    def __init__(self, answer=None):
        self.steps: list[Step] = []
        self.answer = answer

    def __call__(self, ctx, step, on_line=None):
        self.steps.append(step)
        lines = self.answer(step) if self.answer else []
        for line in lines:
            if on_line:
                on_line(line)
        return lines


def _ctx(tmp_path: Path, runner) -> Context:
    config = load_config({"cache_dir": str(tmp_path / "cache"), "base_dir": str(tmp_path / "base")}, files=[])
    return Context(config=config, ui=Reporter("plain"), step_runner=runner)


def _mount(step: Step, target: str) -> Path:
    return next(m.source for m in step.mounts if m.target == target)


def _pip_spec(tmp_path: Path) -> MethodSpec:
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "envmgr.toml").write_text('name = "p"\nbackend = "pip"\nentry = ["python", "x.py"]\n')
    (folder / "requirements.txt").write_text("requests==2.31.0\n")
    return load_spec(folder / "envmgr.toml", builtin=False)


def test_pip_lock_is_one_compile_step_whose_output_becomes_the_lock(tmp_path):
    def compile_in_container(step: Step) -> list[str]:
        work = _mount(step, paths.CONTAINER_WORK)
        assert (work / "requirements.in").read_text().startswith("requests==2.31.0")
        (work / "requirements.lock.txt").write_text("requests==2.31.0 \\\n    --hash=sha256:" + "a" * 64 + "\n")
        return []

    runner = FakeRunner(compile_in_container)
    spec = _pip_spec(tmp_path)
    backend = get_backend(spec)
    backend.lock(_ctx(tmp_path, runner), spec, BASE)
    [step] = runner.steps
    assert step.image == BASE.image_id and step.network == "host" and step.env["HOME"] == "/tmp"
    assert "pip compile --quiet --generate-hashes" in step.script and f"--python {BASE.python}" in step.script
    assert step.workdir == paths.CONTAINER_WORK and step.method == "p"
    assert not next(m for m in step.mounts if m.target == paths.CONTAINER_WORK).read_only
    lock = (spec.lock_path / "requirements.lock.txt").read_text()
    assert "--hash=sha256:" + "a" * 64 in lock
    backend.check(spec)  # the lock written from the step's output is current


def test_pip_lock_refuses_an_index_the_resolver_recorded(tmp_path):
    def leak(step: Step) -> list[str]:
        (_mount(step, paths.CONTAINER_WORK) / "requirements.lock.txt").write_text("--index-url http://x\n")
        return []

    spec = _pip_spec(tmp_path)
    with pytest.raises(EnvmgrError, match="recorded an index"):
        get_backend(spec).lock(_ctx(tmp_path, FakeRunner(leak)), spec, BASE)
    assert not (spec.lock_path / "requirements.lock.txt").exists()


def test_pip_install_is_one_hash_checked_step_into_the_prefix(tmp_path):
    spec = _pip_spec(tmp_path)
    spec.lock_path.mkdir(parents=True, exist_ok=True)
    (spec.lock_path / "requirements.lock.txt").write_text("requests==2.31.0 --hash=sha256:" + "a" * 64 + "\n")
    seen: list[str] = []
    runner = FakeRunner(lambda step: seen.append((_mount(step, paths.CONTAINER_WORK) / "requirements.txt")
                                                 .read_text()) or ["+ requests==2.31.0"])
    prefix = tmp_path / "prefix"
    get_backend(spec).install(_ctx(tmp_path, runner), spec, BASE, prefix)
    [step] = runner.steps
    assert "--require-hashes --no-deps --strict" in step.script
    assert _mount(step, spec.env_prefix) == prefix
    assert not next(m for m in step.mounts if m.target == spec.env_prefix).read_only
    assert next(m for m in step.mounts if m.target == paths.CONTAINER_WORK).read_only
    assert seen == ["requests==2.31.0 --hash=sha256:" + "a" * 64 + "\n"]


def test_poetry_install_hands_the_locked_pins_to_one_step(tmp_path):
    spec = load_spec(REPO / "envs" / "sd-demo" / "envmgr.toml")
    seen: list[str] = []
    runner = FakeRunner(lambda step: seen.append((_mount(step, paths.CONTAINER_WORK) / "requirements.txt")
                                                 .read_text()) or [])
    get_backend(spec).install(_ctx(tmp_path, runner), spec, BASE, tmp_path / "prefix")
    [step] = runner.steps
    assert step.title == f"installing {spec.name}'s environment"
    assert f"venv --quiet --allow-existing --python {BASE.python} {spec.env_prefix}" in step.script
    pins = re.findall(r"^([A-Za-z0-9_.\-]+)==", seen[0], flags=re.M)
    assert "diffusers" in pins and "--hash=sha256:" in seen[0]



def test_poetry_lock_tools_are_installed_with_their_bytecode_once_per_base(tmp_path, monkeypatch):
    monkeypatch.delenv("ENVMGR_STORE_DIR", raising=False)
    runner = FakeRunner()
    ctx = _ctx(tmp_path, runner)
    backend = PoetryBackend()
    tools = backend._tools(ctx, BASE)
    assert backend._tools(ctx, BASE) == tools
    [step] = runner.steps     # the lock step runs poetry with -B from a read-only mount: the .pyc files come now
    assert "pip install --quiet --compile-bytecode" in step.script and f"poetry=={POETRY_VERSION}" in step.script
    assert (tools / ".complete").exists() and (tools / TOOLS_BYTECODE).exists()


def test_poetry_lock_tools_made_without_bytecode_are_compiled_once_in_place(tmp_path, monkeypatch):
    monkeypatch.delenv("ENVMGR_STORE_DIR", raising=False)
    runner = FakeRunner()
    ctx = _ctx(tmp_path, runner)
    name = f"poetry-{POETRY_VERSION}-mirror-{PYPI_MIRROR_PLUGIN_VERSION}-{BASE.diff_id.split(':')[1][:12]}"
    made_before = ctx.store_dir / "tools" / name
    made_before.mkdir(parents=True)
    (made_before / ".complete").touch()
    (made_before / "kept").touch()
    backend = PoetryBackend()
    assert backend._tools(ctx, BASE) == made_before and backend._tools(ctx, BASE) == made_before
    [step] = runner.steps
    assert "-m compileall" in step.script and "pip install" not in step.script
    assert _mount(step, f"{paths.CONTAINER_TOOLS_DIR}/poetry") == made_before
    assert not next(m for m in step.mounts if m.source == made_before).read_only
    assert (made_before / "kept").exists() and (made_before / TOOLS_BYTECODE).exists()


def _poetry_method(tmp_path: Path) -> Path:
    """A poetry method `m` pinning six, in tmp_path/m."""
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "envmgr.toml").write_text('name = "m"\nbackend = "poetry"\nentry = ["python", "x.py"]\n')
    (folder / "pyproject.toml").write_text('[project]\nname = "m"\nversion = "0.1.0"\n'
                                           'requires-python = ">=3.11,<3.12"\ndependencies = ["six==1.16.0"]\n'
                                           '\n[tool.poetry]\npackage-mode = false\n')
    return folder


def test_poetry_lock_step_runs_poetry_without_a_keyring(tmp_path, monkeypatch):
    monkeypatch.delenv("ENVMGR_STORE_DIR", raising=False)
    folder = _poetry_method(tmp_path)

    def lock_in_container(step: Step) -> list[str]:
        if "wheels_only_poetry.py lock" in step.script:
            (_mount(step, paths.CONTAINER_WORK) / "poetry.lock").write_text(
                'package = []\n\n[metadata]\nlock-version = "2.1"\npython-versions = ">=3.11,<3.12"\n'
                'content-hash = "' + "0" * 64 + '"\n')
        return []

    runner = FakeRunner(lock_in_container)
    spec = load_spec(folder / "envmgr.toml", builtin=False)
    get_backend(spec).lock(_ctx(tmp_path, runner), spec, BASE)
    [lock_step] = [s for s in runner.steps if "wheels_only_poetry.py lock" in s.script]
    assert lock_step.env["POETRY_KEYRING_ENABLED"] == "false"
    assert (spec.lock_path / "poetry.lock").is_file()

def _poetry_locked(tmp_path: Path):
    """A poetry method locked through a fake container that writes a lock of one package."""
    folder = _poetry_method(tmp_path)

    def lock_in_container(step: Step) -> list[str]:
        if "wheels_only_poetry.py lock" in step.script:
            (_mount(step, paths.CONTAINER_WORK) / "poetry.lock").write_text(
                '[[package]]\nname = "six"\nversion = "1.16.0"\ngroups = ["main"]\nfiles = [\n'
                '    {file = "six-1.16.0-py2.py3-none-any.whl", hash = "sha256:' + "1" * 64 + '"},\n]\n\n'
                '[metadata]\nlock-version = "2.1"\npython-versions = ">=3.11,<3.12"\n'
                'content-hash = "' + "0" * 64 + '"\n')
        return []

    spec = load_spec(folder / "envmgr.toml", builtin=False)
    backend = PoetryBackend()
    backend.lock(_ctx(tmp_path, FakeRunner(lock_in_container)), spec, BASE)
    return spec, backend


def test_the_check_after_a_poetry_lock_reads_the_file_and_parses_it_once(tmp_path, monkeypatch):
    import envmgr.lock.backends.poetry as poetry

    monkeypatch.delenv("ENVMGR_STORE_DIR", raising=False)
    parses: list[int] = []
    loads = poetry.tomllib.loads

    def counted(text: str) -> dict:
        parses.append(len(text))
        return loads(text)

    monkeypatch.setattr(poetry.tomllib, "loads", counted)
    spec, backend = _poetry_locked(tmp_path)
    lock_parses = [n for n in parses if n > 300]   # the lock, not the small pyproject
    assert len(lock_parses) == 1
    backend.check(spec)                            # the text on disk is the one parsed: not parsed again
    assert len([n for n in parses if n > 300]) == 1
    assert 'content-hash = "' + "0" * 64 not in (spec.lock_path / "poetry.lock").read_text()  # envmgr's own hash


def test_the_check_after_a_poetry_lock_still_sees_a_lock_changed_on_disk(tmp_path, monkeypatch):
    from envmgr.core.errors import StaleLockError

    monkeypatch.delenv("ENVMGR_STORE_DIR", raising=False)
    spec, backend = _poetry_locked(tmp_path)
    path = spec.lock_path / "poetry.lock"
    path.write_text(re.sub(r'content-hash = "[0-9a-f]+"', 'content-hash = "' + "f" * 64 + '"', path.read_text()))
    with pytest.raises(StaleLockError):
        backend.check(spec)
    path.write_text("not [ toml")
    with pytest.raises(StaleLockError, match="not a valid lock"):
        backend.check(spec)


def test_conda_pip_packages_go_into_the_conda_python_in_one_step(tmp_path):
    spec = load_spec(REPO / "envs" / "conda-demo" / "envmgr.toml")
    prefix = tmp_path / "prefix"
    (prefix / "bin").mkdir(parents=True)
    (prefix / "bin" / "python").write_text("")
    runner = FakeRunner()
    get_backend(spec)._install_python(_ctx(tmp_path, runner), spec, BASE, prefix, "six==1.16.0 --hash=sha256:ab\n")
    [step] = runner.steps
    assert f"--python {spec.env_prefix}/bin/python --require-hashes" in step.script
    assert _mount(step, spec.env_prefix) == prefix


class _Engine:
    """Plays a container that prints `lines` and exits with `code`."""

    def __init__(self, lines: list[str], code: int):
        self.lines, self.code, self.specs = lines, code, []

    def run(self, spec, on_line=None, on_start=None):
        self.specs.append(spec)
        for line in self.lines:
            on_line(line)
        return ContainerResult(exit_code=self.code)


@pytest.mark.parametrize("lines, error, words", [
    (["error: Connection refused (os error 111)"], MirrorError, "a mirror did not answer"),
    (["Hash mismatch for `six==1.16.0`"], MirrorError, "does not match the hash in the lock"),
    (["something else broke"], EnvmgrError, "failed (exit 2)"),
])
def test_the_step_runner_runs_steps_in_a_container_and_names_the_failure(tmp_path, lines, error, words):
    ctx = _ctx(tmp_path, run_in_container)
    ctx._engine = _Engine(lines, 2)
    step = Step(title="locking m", image="sha256:x", script="true", env={"A": "1"}, method="m")
    with pytest.raises(error, match=re.escape(words)):
        run_in_container(ctx, step)
    [container] = ctx._engine.specs
    assert container.command == ["/bin/sh", "-ec", "true"] and container.network == "host"
    assert container.labels[paths.LABEL_KIND] == "step"


def test_the_step_runner_returns_the_lines_of_a_step_that_succeeds(tmp_path):
    ctx = _ctx(tmp_path, run_in_container)
    ctx._engine = _Engine(["one", "two"], 0)
    assert run_in_container(ctx, Step(title="t", image="i", script="true")) == ["one", "two"]


def test_a_step_script_that_ends_in_a_traceback_is_named_by_its_last_line_not_its_frames(tmp_path):
    ctx = _ctx(tmp_path, run_in_container)
    ctx._engine = _Engine(["splitting 12 units", "Traceback (most recent call last):",
                           '  File "/tmp/work/split.py", line 88, in <module>', "    os.rename(src, dst)",
                           "FileNotFoundError: [Errno 2] No such file or directory: 'nvidia/__init__.py'"], 1)
    with pytest.raises(EnvmgrError) as raised:
        run_in_container(ctx, Step(title="installing m", image="sha256:x", script="true", method="m"))
    message = raised.value.message
    assert message == ("installing m failed (exit 1): FileNotFoundError: [Errno 2] No such file or directory: "
                       "'nvidia/__init__.py' (at split.py:88)")
    assert "Traceback" not in message and "-v" in (raised.value.hint or "")


def test_a_method_imports_only_its_own_backend():
    """`envmgr run` of a poetry method (and each of its Slurm steps) does not pay for conda's rattler at start."""
    import subprocess
    import sys

    probe = ("import sys; from pathlib import Path; from envmgr.lock.backends import get_backend; "
             "from envmgr.core.spec import load_spec; "
             f"backend = get_backend(load_spec(Path({str(REPO / 'envs' / 'sd-demo' / 'envmgr.toml')!r}))); "
             "print(type(backend).__name__, sorted(m for m in sys.modules if m.startswith('envmgr.lock.backends.')))")
    said = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert said.startswith("PoetryBackend ")
    assert "envmgr.lock.backends.poetry" in said
    assert "envmgr.lock.backends.conda" not in said and "envmgr.lock.backends.pip'" not in said


def test_an_unknown_backend_is_one_line_naming_the_known_ones(tmp_path):
    from envmgr.core.errors import UsageError
    from envmgr.lock.backends import get_backend

    spec = _pip_spec(tmp_path)
    broken = spec.model_copy(update={"backend": "pixi"})
    with pytest.raises(UsageError, match=r"unknown backend 'pixi' \(known: conda, pip, poetry\)"):
        get_backend(broken)


def _dated_pip_spec(tmp_path: Path, extra: str = "") -> MethodSpec:
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "envmgr.toml").write_text('name = "d"\nbackend = "pip"\nentry = ["python", "x.py"]\n'
                                        'source_date = "2025-12-03"\n' + extra)
    (folder / "requirements.txt").write_text("requests>=2\n")
    return load_spec(folder / "envmgr.toml", builtin=False)


def _compiles(lock_line: str = "requests==2.31.0"):
    def answer(step: Step) -> list[str]:
        (_mount(step, paths.CONTAINER_WORK) / "requirements.lock.txt").write_text(
            lock_line + " \\\n    --hash=sha256:" + "a" * 64 + "\n")
        return []
    return answer


def test_a_repository_that_pins_nothing_is_locked_as_of_the_day_after_its_own(tmp_path):
    runner = FakeRunner(_compiles())
    spec = _dated_pip_spec(tmp_path)
    backend = get_backend(spec)
    backend.lock(_ctx(tmp_path, runner), spec, BASE)
    [step] = runner.steps
    assert "--exclude-newer 2025-12-04" in step.script
    lock = (spec.lock_path / "requirements.lock.txt").read_text()
    assert "# envmgr: versions published before 2025-12-04" in lock
    backend.check(spec)
    # another day in the spec makes the lock stale; false takes the newest versions
    spec.adapt.resolve_as_of = "2026-01-01"
    with pytest.raises(EnvmgrError, match="does not match"):
        backend.check(spec)
    spec.adapt.resolve_as_of = False
    runner = FakeRunner(_compiles())
    backend.lock(_ctx(tmp_path, runner), spec, BASE)
    assert "--exclude-newer" not in runner.steps[0].script
    backend.check(spec)


def test_an_index_without_upload_dates_gets_the_newest_versions_said_so(tmp_path):
    """uv's dated solve excludes every undated file; why, it says only without --quiet (a second, scratch run)."""
    def runner(ctx, step, on_line=None):
        if "--exclude-newer" in step.script and "--quiet" in step.script:
            raise EnvmgrError("locking d failed (exit 1): error: No solution found | hint: `requests` was filtered "
                              "by `exclude-newer` to only include packages uploaded before 2025-12-04T00:00:00Z")
        if "--exclude-newer" in step.script:
            assert "dated-probe.txt" in step.script   # never over the lock's own output file
            on_line("warning: `requests-2.31.0-py3-none-any.whl` is missing an upload date, but user provided: "
                    "2025-12-04T00:00:00Z")
            raise EnvmgrError("locking d failed (exit 1)")
        return _compiles()(step)

    spec = _dated_pip_spec(tmp_path)
    backend = get_backend(spec)
    backend.lock(_ctx(tmp_path, runner), spec, BASE)
    lock = (spec.lock_path / "requirements.lock.txt").read_text()
    assert "no upload dates" in lock and "versions published before" not in lock
    backend.check(spec)   # current: the index could not date it


def test_a_pin_newer_than_the_day_is_told_how_to_move_the_day(tmp_path):
    def answer(step: Step) -> list[str]:
        if "--exclude-newer" in step.script:
            raise EnvmgrError("locking d failed (exit 1): hint: `requests` was filtered by `exclude-newer` to only "
                              "include packages uploaded before 2025-12-04T00:00:00Z")
        return []

    spec = _dated_pip_spec(tmp_path)
    with pytest.raises(EnvmgrError) as raised:
        get_backend(spec).lock(_ctx(tmp_path, FakeRunner(answer)), spec, BASE)
    assert "resolve_as_of" in (raised.value.hint or "")


def test_the_lock_step_runs_poetry_with_its_imports_frozen_and_fewer_young_collections(tmp_path):
    """The wrapper the lock step starts poetry with, run against a stand-in poetry package: poetry's `main` gets
    the arguments, runs with what was imported frozen out of the collector and the young generation collected
    every 50,000 allocations, and its exit code is the step's."""
    import json
    import subprocess
    import sys

    from envmgr.lock.backends.poetry import WHEELS_ONLY_POETRY

    for module, text in {
        "poetry/__init__.py": "", "poetry/console/__init__.py": "", "poetry/inspection/__init__.py": "",
        "poetry/utils/__init__.py": "",
        "poetry/inspection/info.py": "get_pep517_metadata = isolated_builder = None\n",
        "poetry/utils/isolated_build.py": "isolated_builder = None\n",
        "poetry/console/application.py": (
            "import gc, json, sys\n"
            "def main():\n"
            "    print(json.dumps({'argv': sys.argv, 'threshold': gc.get_threshold(),\n"
            "                      'frozen': gc.get_freeze_count()}))\n"
            "    return 3\n"),
    }.items():
        (tmp_path / module).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / module).write_text(text)
    (tmp_path / "wheels_only_poetry.py").write_text(WHEELS_ONLY_POETRY)
    done = subprocess.run([sys.executable, "-B", str(tmp_path / "wheels_only_poetry.py"), "lock"], cwd=tmp_path,
                          capture_output=True, text=True, env={"PYTHONPATH": str(tmp_path)})
    assert done.returncode == 3, done.stderr
    seen = json.loads(done.stdout)
    assert seen["argv"] == ["poetry", "lock"]
    assert seen["threshold"] == [50_000, 20, 100] and seen["frozen"] > 0
