"""`envmgr method add` and adaptations: bad input gives one line and adds nothing."""

import tarfile
import zipfile
from pathlib import Path

import pytest

from envmgr.core.errors import UsageError
from envmgr.core.spec import Adaptations
from envmgr.lock.adapt import adapt_pyproject, effective_requirements, unreachable_in_pyproject
from envmgr.lock.methods import add_method

PYPROJECT = """\
[tool.poetry]
name = "third"
version = "0.1"
[tool.poetry.dependencies]
python = ">=3.11,<3.12"
envmgr-alpha = "^1.0"
envmgr-beta = { git = "https://example.invalid/beta.git", rev = "main" }
torchish = { version = "2.0", source = "pytorch" }
deepspeedish = "*"
[[tool.poetry.source]]
name = "pytorch"
url = "https://example.invalid/whl/cu121"
priority = "explicit"
"""


def _repo(root, files):
    root.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def _zip(path, files, prefix="repo/"):
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in files.items():
            zf.writestr(prefix + name, text)
        zf.writestr("__MACOSX/._train.sh", "junk")
        zf.writestr(prefix + ".DS_Store", "junk")
    return path


def test_add_from_zip_keeps_files_byte_identical_and_drops_junk(tmp_path):
    files = {"pyproject.toml": PYPROJECT, "train.sh": "#!/bin/sh\necho hi\n", "pkg/mod.py": "x = 1\n"}
    spec, detected = add_method(tmp_path / "base", _zip(tmp_path / "r.zip", files), "third")
    assert detected.backend == "poetry" and spec.entry == ["bash", "train.sh"] and not spec.platform_args
    source = spec.source_path
    assert {p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file()} == set(files)
    assert all((source / n).read_text() == t for n, t in files.items())
    assert not list((tmp_path / "base" / "methods").glob(".adding-*"))


def test_add_detects_pip_and_train_py(tmp_path):
    repo = _repo(tmp_path / "r", {"requirements.txt": "envmgr-alpha\n", "train.py": "print(1)\n"})
    spec, detected = add_method(tmp_path / "base", repo, "pipper")
    assert detected.backend == "pip" and spec.entry == ["python", "train.py"]


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file"),
    ("not-archive", "not a folder, a zip or a tar"),
    ("zip-slip", "escapes the destination"),
    ("no-env", "no environment file found"),
    ("disagree", "disagree"),
    ("no-entry", "no train.sh or train.py at the top of the repository, and no package"),
    ("bad-entry", "--entry nope.sh: no such file"),
])
def test_bad_sources_add_nothing(tmp_path, case, message):
    base = tmp_path / "base"
    entry = None
    if case == "missing":
        source = tmp_path / "nothing.zip"
    elif case == "not-archive":
        source = tmp_path / "file.zip"
        source.write_text("not a zip")
    elif case == "zip-slip":
        source = tmp_path / "evil.zip"
        with zipfile.ZipFile(source, "w") as zf:
            zf.writestr("train.sh", "x")
            zf.writestr("../../escaped.txt", "x")
    elif case == "no-env":
        source = _repo(tmp_path / "r", {"train.sh": "x"})
    elif case == "disagree":
        source = _repo(tmp_path / "r", {"pyproject.toml": PYPROJECT, "requirements.txt": "numpy\n", "train.sh": "x"})
    elif case == "no-entry":
        source = _repo(tmp_path / "r", {"requirements.txt": "numpy\n"})
    else:
        source = _repo(tmp_path / "r", {"requirements.txt": "numpy\n", "train.sh": "x"})
        entry = "nope.sh"
    with pytest.raises(UsageError) as err:
        add_method(base, source, "m", entry=entry)
    assert message in str(err.value)
    assert not (base / "methods" / "m").exists()
    assert not (tmp_path / "escaped.txt").exists()


def test_tar_with_link_out_is_refused(tmp_path):
    source = tmp_path / "r.tar.gz"
    with tarfile.open(source, "w:gz") as tf:
        info = tarfile.TarInfo("repo/link")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tf.addfile(info)
    with pytest.raises(UsageError, match="links outside"):
        add_method(tmp_path / "base", source, "m")


def test_name_already_taken(tmp_path):
    repo = _repo(tmp_path / "r", {"requirements.txt": "numpy\n", "train.sh": "x"})
    add_method(tmp_path / "base", repo, "dup")
    with pytest.raises(UsageError, match="already exists"):
        add_method(tmp_path / "base", repo, "dup")
    with pytest.raises(UsageError, match="already exists"):
        add_method(tmp_path / "base", repo, "sd-demo")


def test_unreachable_sources_are_all_named_with_their_fix():
    import tomllib

    data = tomllib.loads(PYPROJECT)
    problems = unreachable_in_pyproject(data, Adaptations(), {})
    text = "; ".join(problems)
    assert "envmgr-beta comes from git" in text and 'pin = { envmgr-beta = "<version>" }' in text
    assert "index 'pytorch'" in text and 'sources = { pytorch = "default" }' in text
    fixed = Adaptations(pin={"envmgr-beta": "1.1"}, sources={"pytorch": "default"})
    assert unreachable_in_pyproject(data, fixed, {}) == []


def test_adaptations_pin_drop_add_and_map_index():
    import tomllib

    data = tomllib.loads(PYPROJECT)
    adapt = Adaptations(pin={"envmgr-beta": "1.1"}, drop=["deepspeedish"], add={"envmgr-gamma": "2.0"},
                        sources={"pytorch": "default"})
    where = Path("envmgr.toml")
    out = adapt_pyproject(data, adapt, where)
    deps = out["tool"]["poetry"]["dependencies"]
    assert deps["envmgr-beta"] == "==1.1" and "deepspeedish" not in deps and deps["envmgr-gamma"] == "2.0"
    assert deps["torchish"] == "2.0" and "source" not in out["tool"]["poetry"]
    assert data["tool"]["poetry"]["dependencies"]["envmgr-beta"]["git"]  # the original is untouched
    with pytest.raises(UsageError, match="does not depend on"):
        adapt_pyproject(data, Adaptations(drop=["nothere"]), where)


def test_requirements_adaptations_and_unreachable(tmp_path):
    path = tmp_path / "requirements.txt"
    text = ("--extra-index-url https://download.invalid/whl\nenvmgr-alpha>=1.0\n"
            "git+https://example.invalid/x.git#egg=x\nenvmgr-beta @ https://example.invalid/b.whl\nold-thing\n")
    _, _, problems = effective_requirements(text, Adaptations(), path, {})
    assert len(problems) == 3 and "download.invalid" in problems[0]
    effective, mirrors, problems = effective_requirements(
        "--extra-index-url https://download.invalid/whl\nenvmgr-alpha>=1.0\nenvmgr-beta @ https://x.invalid/b.whl\n"
        "old-thing\n", Adaptations(pin={"envmgr-beta": "1.1"}, drop=["old-thing"],
                                   sources={"download.invalid": "mirror"}),
        path, {"download.invalid": "http://127.0.0.1:1/simple/"})
    assert problems == [] and mirrors == ["http://127.0.0.1:1/simple/"]
    assert effective.split() == ["envmgr-alpha>=1.0", "envmgr-beta==1.1"]


SETUP_PY_PROJECT = """\
[build-system]
requires = ["setuptools>=61.0"]
build-backend = "setuptools.build_meta"
[project]
name = "tuner"
dynamic = ["version", "dependencies"]
requires-python = ">=3.11"
[project.scripts]
tuner = "tuner.cli:main"
tuner-train = "tuner.train:main"
"""


def test_a_package_shaped_repository_runs_its_training_module_with_python_m(tmp_path):
    """SimpleTuner 3.x: no train.sh; `tuner/train.py` imports `tuner.helpers`, so it runs as a module from the
    method's folder (as a script its own folder comes first on sys.path and `tuner` is not found)."""
    files = {"pyproject.toml": SETUP_PY_PROJECT, "setup.py": "raise SystemExit('never run')\n",
             "tuner/__init__.py": "", "tuner/train.py": "from tuner.helpers import x\n", "tuner/cli.py": "",
             "tuner/helpers/__init__.py": "x = 1\n"}
    spec, _ = add_method(tmp_path / "base", _repo(tmp_path / "r", files), "tuner")
    assert spec.entry == ["python", "-m", "tuner.train"]
    # --entry naming a file in a package gets the same; a top-level script stays a script
    spec, _ = add_method(tmp_path / "base", _repo(tmp_path / "r", files), "tuner2", entry="tuner/train.py")
    assert spec.entry == ["python", "-m", "tuner.train"]
    files["tools/go.py"] = "print(1)\n"
    spec, _ = add_method(tmp_path / "base", _repo(tmp_path / "r", files), "tuner3", entry="tools/go.py")
    assert spec.entry == ["python", "tools/go.py"]


def test_console_scripts_in_setup_py_name_the_training_module(tmp_path):
    files = {"setup.py": "setup(entry_points={'console_scripts': ['fit-model = trainer.run:main']})\n",
             "requirements.txt": "numpy\n", "trainer/__init__.py": "", "trainer/run.py": "print(1)\n"}
    with pytest.raises(UsageError, match="no package with a train.py or a console script named like train"):
        add_method(tmp_path / "base", _repo(tmp_path / "r", files), "fit")   # a script that does not say train
    files = {"setup.py": "setup(entry_points={'console_scripts': ['train-model = trainer.run:main']})\n",
             "requirements.txt": "numpy\n", "trainer/__init__.py": "", "trainer/run.py": "print(1)\n"}
    spec, _ = add_method(tmp_path / "base", _repo(tmp_path / "r2", files), "fit2")
    assert spec.entry == ["python", "-m", "trainer.run"]


def test_several_training_modules_are_listed_one_a_line_under_the_name_the_user_gave(tmp_path):
    files = {"requirements.txt": "numpy\n", "a/__init__.py": "", "a/train.py": "", "b/__init__.py": "",
             "b/train.py": ""}
    source = _repo(tmp_path / "myrepo", files)
    with pytest.raises(UsageError) as err:
        add_method(tmp_path / "base", source, "m")
    assert str(source) in err.value.message and ".adding-" not in err.value.message
    assert "\n  --entry a/train.py\n  --entry b/train.py" in err.value.message
    assert not (tmp_path / "base" / "methods" / "m").exists()


def test_a_source_build_pin_may_name_a_dependency_of_a_dependency(tmp_path):
    """docopt comes with num2words: built from source at its pin, which becomes a requirement of its own."""
    where = tmp_path / "requirements.txt"
    adapt = Adaptations(build_from_source=["docopt"], pin={"docopt": "0.6.2"})
    text, _, _ = effective_requirements("num2words>=0.5\n", adapt, where, {})
    assert text.splitlines() == ["num2words>=0.5", "docopt==0.6.2"]
    data = adapt_pyproject({"project": {"name": "x", "dependencies": ["num2words>=0.5"]}}, adapt, where)
    assert data["project"]["dependencies"] == ["num2words>=0.5", "docopt==0.6.2"]
    with pytest.raises(UsageError, match="does not depend on") as err:   # a plain pin still names its own deps
        effective_requirements("num2words>=0.5\n", Adaptations(pin={"docopt": "0.6.2"}), where, {})
    assert 'add = { name = "==VERSION" }' in (err.value.hint or "")


def test_the_repositorys_day_is_its_files_or_its_last_commit_whichever_is_older(tmp_path):
    import os
    import subprocess

    from envmgr.lock.methods import repository_date

    repo = _repo(tmp_path / "r", {"requirements.txt": "numpy\n", "train.py": "print(1)\n"})
    for name in ("requirements.txt", "train.py"):
        os.utime(repo / name, (1764720000, 1764720000))   # 2025-12-03 (a release unpacked: its files' times)
    assert repository_date(repo) == "2025-12-03"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=u", "-c", "user.email=u@x", "add", "-A"], check=True)
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=u", "-c", "user.email=u@x", "commit", "-qm", "x"],
                   check=True, env={**os.environ, "GIT_COMMITTER_DATE": "2026-06-01T00:00:00Z"})
    assert repository_date(repo) == "2025-12-03"          # committed later: the files' day
    os.utime(repo / "train.py")                          # a fresh clone: files of today, the commit's day
    assert repository_date(repo) == "2026-06-01"
    zipped = _zip(tmp_path / "r.zip", {"train.py": "x"})
    assert repository_date(zipped) is not None
    spec, _ = add_method(tmp_path / "base", repo, "dated")
    assert spec.source_date == "2026-06-01"
    text = (spec.folder / "envmgr.toml").read_text()
    assert "\n[adapt]\npin = {}\n" in text                 # one-line tables: a proposed `pin = {...}` replaces it
