"""Errors envmgr reports to users: one line that says what failed and what to do, plus an exit code."""

from __future__ import annotations

from enum import IntEnum


class Exit(IntEnum):
    """Exit codes, documented in `envmgr --help`."""

    OK = 0
    FAILED = 1          # the work itself failed (solver, installer, method exited non-zero)
    USAGE = 2           # bad input: unknown method, malformed spec or config, bad flag
    STALE = 3           # a lock is missing or out of date (`envmgr lock --check`, `build`)
    ENGINE = 4          # the Docker Engine is unreachable or refused
    MIRROR = 5          # a mirror or index is unreachable or served bad data
    INTERRUPTED = 130   # Ctrl-C / SIGTERM


class EnvmgrError(Exception):
    """An error with a one-line message for the user and an exit code."""

    exit_code: Exit = Exit.FAILED

    def __init__(self, message: str, *, hint: str | None = None, exit_code: Exit | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        if exit_code is not None:
            self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class UsageError(EnvmgrError):
    exit_code = Exit.USAGE


class StaleLockError(EnvmgrError):
    exit_code = Exit.STALE


class EngineError(EnvmgrError):
    exit_code = Exit.ENGINE


class MirrorError(EnvmgrError):
    exit_code = Exit.MIRROR


class Interrupted(EnvmgrError):
    exit_code = Exit.INTERRUPTED
