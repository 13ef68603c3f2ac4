"""An honest verdict: a method that exits 0 succeeded only if it wrote what a training run writes.

Launchers that always exit 0 (a shell script ending in `echo done`) are common. One function,
`judge`, decides for local runs, Slurm steps and runs settled after envmgr died, by the first rule
that applies (its name is recorded in `run.json` as `verdict.rule`):

- `exit code`: a non-zero exit is a failure; so is nothing else for a spec without `success` globs
  whose `verdict` is "exit-code" (the default for hand-written specs).
- `success`: the spec's `success = ["output/*.safetensors"]` globs, relative to the run directory,
  must each match a file this attempt wrote (a folder matched counts when a file under it was).
- `traceback` (`verdict = "training"`, what `method add` writes, and no `success` globs): an exit 0
  whose log ends in an uncaught Python traceback (`Traceback (most recent call last):`, frames,
  `SomeError: ...`) is a failure.
- `training files` (the same specs): an exit 0 succeeds only if this attempt wrote weights or a
  checkpoint under `output/` (WEIGHT_SUFFIXES, or a file in a `checkpoint*` folder); files under
  cache and log folders do not count.

`success = ["output/*"]` in an added method is what `envmgr method add` wrote before these rules
existed: met by any file, caches and logs included. It is read as `verdict = "training"` with no
globs (LEGACY_DEFAULT), so methods added before get the same verdicts.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from envmgr.core.spec import MethodSpec
from envmgr.door.logs import uncaught_traceback
from envmgr.runs.records import Status

# Filesystem timestamps come from a coarse kernel clock: a file written just after the container
# started may carry a time a little before the moment envmgr read from its own clock.
CLOCK_SLACK_NS = 1_000_000_000

LEGACY_DEFAULT = ["output/*"]     # what `method add` wrote before: met by any cache file, so not a rule
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".onnx", ".h5")
CHECKPOINT_FOLDER = re.compile(r"^(checkpoint|ckpt)", re.I)
# a folder whose name says cache or log holds what a run leaves on its way, not what it trained
_NOT_RESULTS = re.compile(r"cache|^logs?$|^wandb$|^tensorboard$|^runs$|^tmp$|^\.", re.I)
_SCAN_LIMIT = 100_000             # entries looked at under output/ (a run writing millions is not slowed)
LOG_TAIL_BYTES = 256 << 10        # how much of the log's end the traceback and hint rules read

RULE_EXIT, RULE_SUCCESS, RULE_TRACEBACK, RULE_TRAINING = "exit code", "success", "traceback", "training files"
TRAINING_KINDS = ", ".join(f"*{s}" for s in WEIGHT_SUFFIXES) + " or a checkpoint* folder"


def default_rule(spec: MethodSpec) -> str:
    """What decides an exit 0 when the spec has no `success` globs: "training" or "exit-code"."""
    if spec.verdict:
        return spec.verdict
    return "training" if not spec.builtin and spec.success == LEGACY_DEFAULT else "exit-code"


def explicit_globs(spec: MethodSpec) -> list[str] | None:
    """The spec's `success` globs, or None where it has none (an added method's old default counts as none)."""
    if spec.success is None or (not spec.builtin and spec.success == LEGACY_DEFAULT):
        return None
    return spec.success


def _written_since(path: Path, since_ns: int) -> bool:
    if path.is_symlink():
        return False
    if path.is_file():
        return path.stat().st_mtime_ns >= since_ns
    if path.is_dir():
        return any(_written_since(child, since_ns) for child in path.rglob("*") if child.is_file())
    return False


def missing_outputs(spec: MethodSpec, run_dir: Path, started_ns: int) -> list[str]:
    """The spec's success globs that no file written since `started_ns` matches (empty: a success)."""
    since = started_ns - CLOCK_SLACK_NS
    missing = []
    for pattern in explicit_globs(spec) or []:
        if not any(_written_since(match, since) for match in run_dir.glob(pattern)):
            missing.append(pattern)
    return missing


def training_files(output: Path, started_ns: int) -> list[str]:
    """Weights and checkpoint files under `output` written since `started_ns` (relative to its parent),
    caches, logs, links and empty files left out."""
    since = started_ns - CLOCK_SLACK_NS
    found: list[str] = []
    seen = 0
    for folder, dirs, files in os.walk(output):          # never follows links
        dirs[:] = sorted(d for d in dirs if not _NOT_RESULTS.search(d))
        in_checkpoint = any(CHECKPOINT_FOLDER.match(part) for part in Path(folder).relative_to(output).parts)
        for name in sorted(files):
            seen += 1
            path = Path(folder) / name
            if (name.lower().endswith(WEIGHT_SUFFIXES) or in_checkpoint) and not _NOT_RESULTS.search(name):
                info = path.lstat()
                if path.is_file() and not path.is_symlink() and info.st_size > 0 and info.st_mtime_ns >= since:
                    found.append(str(path.relative_to(output.parent)))
        if seen > _SCAN_LIMIT:
            break
    return found


# ---------------------------------------------------------------------- the log



def log_lines(log: Path, start: int = 0) -> list[str]:
    """The method's lines from byte `start` of its log (at most its last LOG_TAIL_BYTES), without envmgr's
    own `# envmgr:` notes; a bar redrawn with carriage returns counts as its last drawing."""
    try:
        fd = os.open(log, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return []
    with os.fdopen(fd, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        fh.seek(max(start, size - LOG_TAIL_BYTES, 0))
        text = fh.read().decode("utf-8", errors="replace")
    lines = [line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n")]
    return [line for line in lines if not line.startswith("# envmgr:")]


_READ_ONLY = re.compile(r"Read-only file system|Errno 30\b|EROFS|PermissionError|Permission denied")


def dataset_hint(lines: list[str], dataset: Any) -> str | None:
    """`dataset_mode = "writable"` when the log says the method could not write under its read-only dataset."""
    if not isinstance(dataset, dict) or dataset.get("mode") == "writable":
        return None
    mount = dataset.get("mounted_at")
    if not isinstance(mount, str) or not mount:
        return None
    under = re.compile(re.escape(mount.rstrip("/")) + r"(/|['\"\s]|$)")
    said = next((line.strip() for line in reversed(lines) if _READ_ONLY.search(line) and under.search(line)), None)
    if said is None:
        return None
    return (f"the method wrote under its dataset ({mount}), which is mounted read-only ({said[:200]}): "
            "set dataset_mode = \"writable\" in the method's envmgr.toml for a writable copy per run")


_NO_MODULE = re.compile(r"ModuleNotFoundError: No module named '([A-Za-z_][A-Za-z0-9_]*)")


def entry_hint(lines: list[str], entry: list[str], source: Path) -> str | None:
    """`python -m pkg.mod` when the entry ran a file of the method's own package as a script and the log says
    that package is not found: a script's own folder comes first on sys.path, not the repository's."""
    missing = next((m.group(1) for line in reversed(lines) for m in [_NO_MODULE.search(line)] if m), None)
    if missing is None or not (source / missing / "__init__.py").is_file():
        return None
    script = next((word for word in entry if word.endswith(".py") and (source / word).is_file()), None)
    if script is None or "-m" in entry:
        return None
    parts = Path(script).with_suffix("").parts
    if parts[0] != missing or not all(part.isidentifier() for part in parts):
        return None
    module = ".".join(parts)
    return (f"{script} imports its own package {missing}, which a script run as `python {script}` does not find "
            f"(its folder, not the repository's, comes first on sys.path): run it as a module: "
            f"entry = [\"python\", \"-m\", \"{module}\"] in the method's envmgr.toml")


# ---------------------------------------------------------------------- the verdict


@dataclass(frozen=True)
class Verdict:
    status: Status                    # succeeded | failed
    rule: str                         # which rule decided (RULE_*)
    detail: str                       # one line for the user
    reason: str | None = None         # run.json's short `reason` when the rule turned an exit 0 into a failure
    missing: tuple[str, ...] = ()     # the `success` globs nothing matched
    hint: str | None = None           # what to do about it

    def fields(self) -> dict[str, Any]:
        """What `run.json` records: the verdict, and the reason and missing outputs of a failed exit 0."""
        out: dict[str, Any] = {"verdict": {"status": self.status, "rule": self.rule, "detail": self.detail,
                                           "hint": self.hint}}
        if self.reason:
            out["reason"] = self.reason
        if self.missing:
            out["missing_outputs"] = list(self.missing)
        return out


def judge(spec: MethodSpec | None, run_dir: Path, exit_code: int | None, started_ns: int, log: Path,
          log_start: int = 0, dataset: Any = None, outputs: bool = True) -> Verdict:
    """The verdict on an attempt that ended with `exit_code` (see the module's rules). `outputs=False`
    (a Slurm rank other than 0, or a method no longer known) leaves the exit code alone to decide."""
    lines = log_lines(log, log_start)
    hint = dataset_hint(lines, dataset)
    if exit_code != 0:
        said = "without an exit status" if exit_code is None else f"exit {exit_code}"
        return Verdict(Status.FAILED, RULE_EXIT, said, hint=hint)
    if spec is None or not outputs:
        return Verdict(Status.SUCCEEDED, RULE_EXIT, "exit 0")
    globs = explicit_globs(spec)
    if globs is not None:
        missing = missing_outputs(spec, run_dir, started_ns)
        if missing:
            return Verdict(Status.FAILED, RULE_SUCCESS,
                           f"exit 0 but it wrote nothing that matches {', '.join(missing)}",
                           reason="no outputs", missing=tuple(missing),
                           hint=hint or "the spec's `success` names what a run must write")
        return Verdict(Status.SUCCEEDED, RULE_SUCCESS, f"exit 0 and it wrote {', '.join(globs)}" if globs else "exit 0")
    if default_rule(spec) != "training":
        return Verdict(Status.SUCCEEDED, RULE_EXIT, "exit 0")
    crash = uncaught_traceback(lines)
    if crash:
        return Verdict(Status.FAILED, RULE_TRACEBACK,
                       f"exit 0 but the log ends in an uncaught traceback: {crash[:300]}",
                       reason="uncaught traceback", hint=hint)
    written = training_files(run_dir / "output", started_ns)
    if not written:
        return Verdict(Status.FAILED, RULE_TRAINING, f"exit 0 but it wrote no weights or checkpoint under output/ "
                       f"({TRAINING_KINDS}; caches and logs do not count)", reason="no training outputs",
                       hint=hint or "if the method writes something else, name it in its envmgr.toml: "
                                    "success = [\"output/<what it writes>\"]")
    more = f" (+{len(written) - 1} more)" if len(written) > 1 else ""
    return Verdict(Status.SUCCEEDED, RULE_TRAINING, f"exit 0 and it wrote {written[0]}{more}")


def describe(record: dict) -> str:
    """`verdict: failed — exit 0 but ... (rule: traceback)` for `runs show`; older records get one from their
    status, reason and exit code."""
    status = str(record.get("status"))
    verdict = record.get("verdict")
    if isinstance(verdict, dict) and verdict.get("status") == status and verdict.get("detail"):
        return f"verdict: {status} — {verdict['detail']} (rule: {verdict.get('rule')})"
    if record.get("reason") == "no outputs":
        missing = ", ".join(record.get("missing_outputs") or [])
        return f"verdict: {status} — exit 0 but it wrote nothing that matches {missing} (rule: {RULE_SUCCESS})"
    if record.get("reason"):
        return f"verdict: {status} — {record['reason']}"
    code = record.get("exit_code")
    if isinstance(code, int):
        return f"verdict: {status} — exit {code} (rule: {RULE_EXIT})"
    return f"verdict: {status}"
