"""Reading TOML files into pydantic models with errors that name the file, the key and the line."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from envmgr.core.errors import UsageError

M = TypeVar("M", bound=BaseModel)


def read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{path}: file not found") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not UTF-8 text (byte {exc.start}): save it as UTF-8") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: not valid TOML: {exc}") from None


def key_line(path: Path, dotted_key: str) -> int | None:
    """Best-effort line number of a key in a TOML file (tomllib keeps no positions)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    parts = dotted_key.split(".")
    leaf = re.escape(parts[-1])
    pattern = re.compile(rf'^\s*["\']?{leaf}["\']?\s*=')
    dotted = r"\.".join(re.escape(p) for p in parts)
    section = re.compile(rf"^\s*\[+\s*{dotted}\s*\]+")
    for number, line in enumerate(lines, start=1):
        if pattern.match(line) or section.match(line):
            return number
    return None


def describe_validation_error(path: Path | str, exc: ValidationError, prefix: str = "") -> str:
    """One line per problem: `file:line: key 'a.b': what was expected`."""
    messages = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"])
        full_key = f"{prefix}{key}" if key else prefix.rstrip(".")
        line = key_line(Path(path), full_key) if isinstance(path, Path) else None
        where = f"{path}:{line}" if line else f"{path}"
        if error["type"] == "extra_forbidden":
            what = "unknown key"
        elif error["type"] == "missing":
            what = "required key is missing"
        else:
            what = error["msg"]
            if "input" in error and not isinstance(error["input"], (dict, list)):
                from envmgr.core.credentials import mask_credentials  # a mistyped value may hold a credential

                what += f" (got {mask_credentials(repr(error['input']))})"
        messages.append(f"{where}: key '{full_key}': {what}")
    return "\n".join(messages)


def load_model(model: type[M], path: Path, data: dict[str, Any] | None = None) -> M:
    data = read_toml(path) if data is None else data
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise UsageError(describe_validation_error(path, exc)) from None
