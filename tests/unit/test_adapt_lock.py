"""The repository's own poetry.lock survives adaptation: the seed lock handed to poetry, and the drift report."""

from pathlib import Path

from envmgr.core.spec import Adaptations
from envmgr.lock.adapt import (
    adapt_pyproject,
    describe_drift,
    index_release,
    lock_drift,
    seed_lock,
    strip_local,
    unreachable_in_pyproject,
)

SOURCE = {"tool": {"poetry": {
    "dependencies": {
        "python": ">=3.11,<3.12",
        "torch": {"version": "2.5.1+cu124", "source": "pytorch"},
        "diffusers": {"git": "https://git.example.invalid/diffusers.git", "rev": "abc"},
        "transformers": "^4.47",
        "opencv-python": "*",
    },
    "source": [{"name": "pytorch", "url": "https://download.example.invalid/whl/cu124", "priority": "explicit"},
               {"name": "internal", "url": "https://pkgs.example.invalid/simple", "priority": "supplemental"}],
}}}

PYTORCH = {"type": "legacy", "url": "https://download.example.invalid/whl/cu124", "reference": "pytorch"}
INTERNAL = {"type": "legacy", "url": "https://pkgs.example.invalid/simple", "reference": "internal"}
LOCK = {"metadata": {"lock-version": "2.0", "python-versions": ">=3.11,<3.12", "content-hash": "0" * 64},
        "package": [
            {"name": "torch", "version": "2.5.1+cu124", "files": [{"file": "torch-2.5.1+cu124.whl", "hash": "sha256:a"}],
             "source": PYTORCH, "dependencies": {"triton": "3.1.0"}},
            {"name": "triton", "version": "3.1.0", "files": [{"file": "triton.whl", "hash": "sha256:b"}]},
            {"name": "diffusers", "version": "0.32.0.dev0", "files": [],
             "source": {"type": "git", "url": "https://git.example.invalid/diffusers.git", "reference": "abc",
                        "resolved_reference": "abc"}},
            {"name": "transformers", "version": "4.47.1", "files": [{"file": "t.whl", "hash": "sha256:c"}]},
            {"name": "opencv-python", "version": "4.10.0.84", "files": [{"file": "o.whl", "hash": "sha256:d"}]},
            {"name": "secretsauce", "version": "1.2", "files": [{"file": "s.whl", "hash": "sha256:e"}],
             "source": INTERNAL},
        ]}


def _names(lock: dict) -> dict[str, str]:
    return {p["name"]: p["version"] for p in lock["package"]}


def test_seed_keeps_every_unadapted_version_and_drops_what_the_adaptation_changes():
    adapt = Adaptations(pin={"diffusers": "0.32.0"}, drop=["opencv-python"], add={"opencv-python-headless": "*"},
                        sources={"pytorch": "default", "internal": "mirror"})
    seed, pins = seed_lock(LOCK, SOURCE, adapt, {"internal": "http://127.0.0.1:9/simple/"})
    # torch (a +cu124 build of an index mapped to the default) leaves the seed and is pinned to its public version
    assert _names(seed) == {"triton": "3.1.0", "transformers": "4.47.1", "secretsauce": "1.2"}
    assert pins == {"torch": "2.5.1"}
    # a package of an index mapped to a mirror keeps its files and points to the mirror
    [sauce] = [p for p in seed["package"] if p["name"] == "secretsauce"]
    assert sauce["source"]["url"] == "http://127.0.0.1:9/simple/" and sauce["files"][0]["hash"] == "sha256:e"
    assert LOCK["package"][-1]["source"]["url"] == INTERNAL["url"], "the repository's lock is not modified"
    assert seed["metadata"] == LOCK["metadata"]


def test_a_user_pin_replaces_the_version_from_the_repository_lock():
    adapt = Adaptations(pin={"torch": "2.6.0", "diffusers": "0.32.0"}, sources={"pytorch": "default"})
    seed, pins = seed_lock(LOCK, SOURCE, adapt)
    assert "torch" not in _names(seed) and pins == {}
    effective = adapt_pyproject(SOURCE, adapt, Path("envmgr.toml"))
    assert effective["tool"]["poetry"]["dependencies"]["torch"] == "==2.6.0"


def test_an_index_mapped_to_the_default_loses_local_labels_in_the_manifest():
    adapt = Adaptations(pin={"diffusers": "0.32.0"}, sources={"pytorch": "default"})
    deps = adapt_pyproject(SOURCE, adapt, Path("envmgr.toml"))["tool"]["poetry"]["dependencies"]
    assert deps["torch"] == "2.5.1"
    assert strip_local("==2.5.1+cu124") == "==2.5.1" and strip_local(">=2.4+cpu.x1,<3") == ">=2.4,<3"
    assert strip_local("1.0.post1") == "1.0.post1"


def test_unreachable_git_dependency_proposes_the_version_of_the_repository_lock():
    problems = unreachable_in_pyproject(SOURCE, Adaptations(sources={"pytorch": "default", "internal": "default"}),
                                        {}, {"Diffusers": "0.32.0.dev0"})
    assert problems == ['diffusers comes from git https://git.example.invalid/diffusers.git → [adapt] pin = '
                        '{ diffusers = "0.32.0" } (its lock has 0.32.0.dev0) (or drop = ["diffusers"])']
    assert index_release("4.48.0.dev0") == "4.48.0" and index_release("2.5.1+cu124") == "2.5.1"
    assert index_release("1.0rc1") == "1.0rc1" and index_release("0.4.0") == "0.4.0"
    without_lock = unreachable_in_pyproject(SOURCE, Adaptations(sources={"pytorch": "default",
                                                                         "internal": "default"}), {})
    assert '"<version>"' in without_lock[0]


def test_drift_names_each_moved_added_and_removed_package():
    ours = {"package": [
        {"name": "torch", "version": "2.5.1"}, {"name": "triton", "version": "3.1.0"},
        {"name": "diffusers", "version": "0.32.0"}, {"name": "transformers", "version": "4.47.1"},
        {"name": "secretsauce", "version": "1.2"}, {"name": "opencv-python-headless", "version": "4.10.0.84"},
    ]}
    drift = lock_drift(LOCK, ours)
    assert drift == [
        {"package": "diffusers", "theirs": "0.32.0.dev0", "ours": "0.32.0"},
        {"package": "opencv-python", "theirs": "4.10.0.84", "ours": None},
        {"package": "opencv-python-headless", "theirs": None, "ours": "4.10.0.84"},
        {"package": "torch", "theirs": "2.5.1+cu124", "ours": "2.5.1"},
    ]
    assert describe_drift(drift) == ["diffusers: 0.32.0.dev0 → 0.32.0", "removed: opencv-python 4.10.0.84",
                                     "added: opencv-python-headless 4.10.0.84", "torch: 2.5.1+cu124 → 2.5.1"]
    assert lock_drift(LOCK, LOCK) == []


def test_a_failed_solve_shows_poetrys_reason_not_deprecation_text():
    from envmgr.core.config import load_config
    from envmgr.core.spec import MethodSpec
    from envmgr.core.ui import Reporter
    from envmgr.door.context import Context
    from envmgr.lock.backends.poetry import solver_error

    ctx = Context(config=load_config({}, files=[]), ui=Reporter("plain"))
    spec = MethodSpec(name="third", entry=["bash", "train.sh"])
    lines = ["/tools/setuptools/_distutils/dist.py:289: SetuptoolsDeprecationWarning: Invalid dash-separated options",
             "!!", "        ********************************************************************************",
             "  warnings.warn(", "Updating dependencies", "Resolving dependencies...", "",
             "Because third-trainer depends on torch (2.5.1+cu124) which doesn't match any versions, version "
             "solving failed."]
    error = solver_error(ctx, spec, lines)
    assert error is not None
    assert error.message == ("locking third: poetry found no solution: Because third-trainer depends on torch "
                             "(2.5.1+cu124) which doesn't match any versions, version solving failed.")
    assert "local version" in (error.hint or "")
    assert solver_error(ctx, spec, lines[:4]) is None
