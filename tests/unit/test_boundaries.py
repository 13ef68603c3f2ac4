"""The architecture's seams: only engine.py talks to the Docker Engine, and backends never run containers."""

from __future__ import annotations

import ast
from pathlib import Path

import envmgr

PACKAGE = Path(envmgr.__file__).parent


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, absolute (`docker.errors`, `envmgr.door.engine`), at any depth of the file."""
    found: set[str] = set()
    package = ["envmgr", *path.relative_to(PACKAGE).parent.parts]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_imports_are_read_relative_to_their_package():
    assert "envmgr.door.engine" in _imports(PACKAGE / "door" / "context.py")
    assert "envmgr.door.containers.BindMount" in _imports(PACKAGE / "lock" / "backends" / "common.py")


def test_only_engine_py_imports_docker():
    offenders = [str(path.relative_to(PACKAGE)) for path in _modules() if path != PACKAGE / "door" / "engine.py"
                 and any(name == "docker" or name.startswith("docker.") for name in _imports(path))]
    assert offenders == [], f"these modules import docker; go through envmgr.door.engine instead: {offenders}"


def test_backends_do_not_import_the_engine():
    offenders = [str(path.relative_to(PACKAGE)) for path in sorted((PACKAGE / "lock" / "backends").glob("*.py"))
                 if any(name == "envmgr.door.engine" or name.startswith("envmgr.door.engine.") for name in _imports(path))]
    assert offenders == [], f"backends describe steps; the build layer runs them: {offenders}"


def test_backends_do_not_reach_the_engine_through_the_context():
    offenders = [f"{path.relative_to(PACKAGE)}:{node.lineno}" for path in sorted((PACKAGE / "lock" / "backends").glob("*.py"))
                 for node in ast.walk(ast.parse(path.read_text(), str(path)))
                 if isinstance(node, ast.Attribute) and node.attr in ("engine", "_engine")]
    assert offenders == [], f"backends hand their steps to ctx.step_runner instead: {offenders}"
