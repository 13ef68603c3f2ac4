import tomllib

from envmgr.core.paths import BUILTIN_METHODS_DIR
from envmgr.lock.backends.poetry import content_hash
from envmgr.lock.backends.poetry_lock import satisfies, select

LINUX = {"python_version": "3.11", "python_full_version": "3.11.2", "sys_platform": "linux",
         "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
         "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}


def test_poetry_constraint_syntax():
    assert satisfies("1.4.2", "^1.2") and not satisfies("2.0.0", "^1.2")
    assert satisfies("0.2.9", "^0.2.1") and not satisfies("0.3.0", "^0.2.1")
    assert satisfies("1.2.9", "~1.2") and not satisfies("1.3.0", "~1.2")
    assert satisfies("13.1.1.3", "==13.1.1.3.*") and not satisfies("13.10.0.20", "==13.1.1.3.*")
    assert satisfies("1.0", "1.0") and satisfies("5", "*") and satisfies("0.5", ">=1.0 || <0.6")


def test_duplicate_versions_are_settled_by_the_dependency_walk():
    lock = {"package": [
        {"name": "torch", "version": "2.0", "dependencies": {"kit": {"version": "1.0", "extras": ["blas"]}}},
        {"name": "kit", "version": "1.0", "dependencies": {
            "blas": {"version": "==1.1.*", "optional": True, "markers": 'extra == "blas"'}}},
        {"name": "cudnn", "version": "9", "dependencies": {"blas": "*"}},
        {"name": "blas", "version": "1.1.3"},
        {"name": "blas", "version": "1.10.0"},
        {"name": "winonly", "version": "1", "markers": 'sys_platform == "win32"'},
    ]}
    pyproject = {"project": {"dependencies": ["torch", "cudnn", "winonly; sys_platform == 'win32'"]}}
    chosen = {p["name"]: p["version"] for p in select(lock, pyproject, LINUX)}
    assert chosen == {"torch": "2.0", "kit": "1.0", "cudnn": "9", "blas": "1.1.3"}


def test_sd_demo_lock_is_current_and_installs_one_version_of_each_package():
    folder = BUILTIN_METHODS_DIR / "sd-demo"
    pyproject = tomllib.loads((folder / "pyproject.toml").read_text())
    lock = tomllib.loads((folder / "poetry.lock").read_text())
    assert lock["metadata"]["content-hash"] == content_hash(pyproject)
    chosen = select(lock, pyproject, LINUX)
    names = [p["name"] for p in chosen]
    assert len(names) == len(set(names))
    versions = {p["name"]: p["version"] for p in chosen}
    assert versions["torch"].startswith("2.13.") and "diffusers" in versions and "peft" in versions
    assert "http" not in (folder / "poetry.lock").read_text().split("[metadata]")[1]
