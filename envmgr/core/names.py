"""Untrusted text into names and host paths: the one place that decides.

Every identifier that reaches envmgr from outside (an archive's export.json, a spec, the command
line, a run record) is checked here with a *full* match: `re.match(r"...$")` also accepts a name
with a trailing newline, `fullmatch` does not. Every host path built from such a name is joined by
`beneath`, which checks that the result stays under its root *before* anything is created there.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator

from envmgr.core.errors import UsageError

# A method name is an image repository path component (`envmgr/<name>`): lower-case alphanumerics
# joined by one '.', one or two '_', or dashes, at most 63 characters.
METHOD = re.compile(r"(?=.{1,63}\Z)[a-z0-9]+(?:(?:\.|_{1,2}|-+)[a-z0-9]+)*")
BASE_IMAGE = METHOD          # `images/<name>/`, tagged `envmgr/base-<name>`
VARIANT = METHOD             # `variants/<name>/`, tagged `envmgr/<method>-<name>`
RUN_ID = re.compile(r"\d{8}-\d{6}-[0-9a-f]{4}")
INPUT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
ENV_VAR = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
# Debian policy: lower-case alphanumerics, '+', '-', '.', at least two characters; an optional
# `=version`. Nothing here can start an option or hold a space, a quote or a newline.
DEB_PACKAGE = re.compile(r"[a-z0-9][a-z0-9+.-]+(?:=[A-Za-z0-9.+~:-]+)?")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
ARCHITECTURE = re.compile(r"[a-z0-9_]{1,32}")


def is_valid(pattern: re.Pattern[str], value: object) -> bool:
    """True when `value` is a string that `pattern` matches whole (no trailing newline, no NUL)."""
    return isinstance(value, str) and pattern.fullmatch(value) is not None


def check(pattern: re.Pattern[str], value: object, what: str, rule: str) -> str:
    """`value` when it is a valid name, else a UsageError that says what it is and what is expected."""
    if not is_valid(pattern, value):
        raise UsageError(f"{what} {value!r} is not valid: {rule}")
    return value  # type: ignore[return-value]  # is_valid checked it is a str


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def is_component(part: str) -> bool:
    """One plain path component: not empty, not '.' or '..', no '/', no control character (NUL, newline)."""
    return bool(part) and part not in (".", "..") and "/" not in part and not _CONTROL.search(part)


def beneath(root: Path, *parts: str) -> Path:
    """`root/parts...`, each part a single plain component, so the result stays lexically under `root`.

    Nothing is created and nothing is resolved: a name from outside can neither climb out (`..`),
    nor replace the root (an absolute name), nor carry a separator. Raises UsageError naming the part.
    """
    for part in parts:
        if not isinstance(part, str) or not is_component(part):
            raise UsageError(f"{part!r} is not a plain name: refusing to use it as a folder under {root}")
    return root.joinpath(*parts)


def _checked(pattern: re.Pattern[str], rule: str):
    def check(value: str) -> str:
        if not is_valid(pattern, value):
            raise ValueError(rule)
        return value
    return AfterValidator(check)


# The same rules as field types, for the pydantic models of files that come from outside.
MEMBER_NAME = re.compile(r"[^\x00-\x1f\x7f\\]{1,1024}")    # an archive member: no control characters
IMAGE_TAG = re.compile(r"envmgr/[a-z0-9._-]{1,127}:[0-9a-f]{16,64}")
MethodName = Annotated[str, _checked(METHOD, "lower-case letters and digits joined by '.', '_' or '-'")]
BaseImageName = Annotated[str, _checked(BASE_IMAGE, "lower-case letters and digits joined by '.', '_' or '-'")]
Digest = Annotated[str, _checked(DIGEST, "sha256: and 64 lower-case hex digits")]
Sha256Hex = Annotated[str, _checked(SHA256_HEX, "64 lower-case hex digits")]
Architecture = Annotated[str, _checked(ARCHITECTURE, "an architecture name such as amd64")]
MemberName = Annotated[str, _checked(MEMBER_NAME, "a member name without control characters")]
ImageTag = Annotated[str, _checked(IMAGE_TAG, "envmgr/<method>:<hex>")]
