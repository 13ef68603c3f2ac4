"""What a method left in its run's `output/`, inspected before it is reported or handed over.

The method wrote `output/` as it liked, so envmgr looks at it without following a link (envmgr/runs/owned.py):

- folders and regular files are the run's outputs; only they are listed as artifacts (LoRA, checkpoints,
  validation images, ...) in run.json;
- symbolic links, named pipes, sockets and devices are never listed: each is named in the log and in the
  record (`refused_outputs`) with what it is, and left where it is, unfollowed;
- a file with a hard link outside `output/` (more links than names in it) is refused the same way;
- setuid and setgid bits and write access for everyone are dropped (named in `changed_outputs`);
- the outputs belong to the person who ran envmgr: under sudo they are handed to SUDO_UID:SUDO_GID; when
  root ran envmgr without sudo (the method ran as the site's `run_as`, e.g. nobody) they are made readable
  by everyone (folders: readable and searchable); otherwise the method ran as the invoking user, who owns
  them and gets read access to them. Done when the run ends, however it ends (interrupted too).
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections import Counter
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

from envmgr.core.errors import UsageError
from envmgr.door.context import Context
from envmgr.runs import owned, records

DROPPED_BITS = stat.S_ISUID | stat.S_ISGID | stat.S_IWOTH


@dataclass(frozen=True)
class Handover:
    """Who the outputs are for: `owner` (uid, gid) they are given to, or readable by `everyone`."""

    owner: tuple[int, int] | None = None
    everyone: bool = False

    @classmethod
    def for_invoker(cls) -> Handover:
        """The rule for the user who ran this envmgr (see the module's docstring)."""
        if os.getuid() != 0:
            return cls()
        sudo_uid = os.environ.get("SUDO_UID", "")
        if sudo_uid.isdigit() and sudo_uid != "0":
            gid = os.environ.get("SUDO_GID", sudo_uid)
            return cls(owner=(int(sudo_uid), int(gid) if gid.isdigit() else int(sudo_uid)))
        return cls(everyone=True)

    def recorded(self) -> str:
        """As run.json keeps it (`outputs_for`), so a later envmgr that settles the run applies the same rule."""
        return f"{self.owner[0]}:{self.owner[1]}" if self.owner else "everyone" if self.everyone else "owner"

    @classmethod
    def from_record(cls, text: object) -> Handover:
        if isinstance(text, str) and text.count(":") == 1 and all(p.isdigit() for p in text.split(":")):
            uid, gid = text.split(":")
            return cls(owner=(int(uid), int(gid)))
        return cls(everyone=text == "everyone")

    def mode(self, st: os.stat_result) -> int:
        is_dir = stat.S_ISDIR(st.st_mode)
        read = (0o555 if is_dir else 0o444) if self.everyone else (0o500 if is_dir else 0o400)
        return (stat.S_IMODE(st.st_mode) | read) & ~DROPPED_BITS


@dataclass
class Outputs:
    kept: list[owned.Entry] = field(default_factory=list)      # folders and regular files (relative to output/)
    refused: list[dict[str, str]] = field(default_factory=list)
    changed: list[dict[str, str]] = field(default_factory=list)
    present: bool = False                                        # output/ is there (a real folder)

    def artifacts(self) -> dict[str, list[str]]:
        """run.json's `artifacts`, from what was kept only (paths relative to the run dir, as before)."""
        kinds = {e.relative: stat.S_ISDIR(e.st.st_mode) for e in self.kept}

        def top(pattern: str, folders: bool | None = None) -> list[str]:
            return sorted(f"{records.OUTPUT}/{rel}" for rel, is_dir in kinds.items()
                          if "/" not in rel and fnmatch(rel, pattern) and folders in (None, is_dir))

        images = sorted(f"{records.OUTPUT}/{rel}" for rel in kinds
                        if rel.startswith("validation_images/") and rel.count("/") == 1)
        if not self.present:
            return {}
        return {"lora": top("*.safetensors"), "checkpoints": top("checkpoint-*", folders=True),
                "validation_images": images if kinds.get("validation_images") else [],
                "loss_plot": top("loss.png"), "metrics": top("metrics.jsonl")}


def inspect(run_dir: Path, handover: Handover | None = None) -> Outputs:
    """Look at `run_dir/output` without following a link; with `handover`, also drop setuid/setgid and
    world-write bits and hand the kept outputs over (see the module's docstring)."""
    found = Outputs()
    top = owned.lstat(run_dir, records.OUTPUT)
    if top is None or not stat.S_ISDIR(top.st_mode):
        if top is not None:
            found.refused.append({"path": records.OUTPUT, "reason": owned.kind_of(top.st_mode)})
        return found
    found.present = True
    entries = list(owned.walk(run_dir, records.OUTPUT))
    names = Counter((e.st.st_dev, e.st.st_ino) for e in entries if stat.S_ISREG(e.st.st_mode))
    for entry in entries:
        shown = f"{records.OUTPUT}/{entry.relative}"
        if stat.S_ISLNK(entry.st.st_mode):
            found.refused.append({"path": shown, "reason": f"{entry.kind} (to {_link_target(run_dir, shown)!r})"})
        elif not (stat.S_ISDIR(entry.st.st_mode) or stat.S_ISREG(entry.st.st_mode)):
            found.refused.append({"path": shown, "reason": entry.kind})
        elif stat.S_ISREG(entry.st.st_mode) and entry.st.st_nlink > names[(entry.st.st_dev, entry.st.st_ino)]:
            found.refused.append({"path": shown, "reason": f"a hard link ({entry.st.st_nlink} names, "
                                                           "some outside output/)"})
        else:
            found.kept.append(entry)
    if handover is not None:
        _hand_over(run_dir, top, found, handover)
    return found


def inspect_noted(ctx: Context, run_dir: Path, handover: Handover | None, log_file: str = records.LOG) -> Outputs:
    """`inspect`, with what is refused and changed named in the run's log and said as warnings; an output/
    that cannot be inspected is itself refused."""
    try:
        outputs = inspect(run_dir, handover)
    except (OSError, UsageError) as exc:
        reason = exc.message if isinstance(exc, UsageError) else str(exc)
        outputs = Outputs(refused=[{"path": records.OUTPUT, "reason": f"not inspected: {reason}"}])
    notes = ([f"{r['path']} is not listed as an output: {r['reason']}" for r in outputs.refused]
             + [f"{c['path']}: {c['change']}" for c in outputs.changed])
    if notes:
        with contextlib.suppress(OSError, UsageError), records.open_log(run_dir, log_file) as log:
            log.writelines(f"# envmgr: {note}\n" for note in notes)
        for note in notes:
            ctx.ui.warn(note)
    return outputs


def _link_target(run_dir: Path, shown: str) -> str:
    try:
        with owned.folder(run_dir, str(Path(shown).parent)) as fd:
            return os.readlink(Path(shown).name, dir_fd=fd)
    except (OSError, owned.Refused):
        return "?"


def _hand_over(run_dir: Path, top: os.stat_result, found: Outputs, handover: Handover) -> None:
    owner = handover.owner if os.getuid() == 0 else None
    for entry in [owned.Entry("", top), *found.kept]:
        wanted = handover.mode(entry.st)
        whole = owned.Entry(f"{records.OUTPUT}/{entry.relative}".rstrip("/"), entry.st)
        try:
            done = owned.change(run_dir, whole, wanted, owner)
        except OSError:       # another user's run settled by this one: leave it as it is
            continue
        dropped = stat.S_IMODE(entry.st.st_mode) & DROPPED_BITS
        if done and dropped:
            what = [name for bit, name in ((stat.S_ISUID, "setuid"), (stat.S_ISGID, "setgid"),
                                           (stat.S_IWOTH, "write for everyone")) if dropped & bit]
            found.changed.append({"path": whole.relative, "change": " and ".join(what) + " dropped"})


def artifacts(run_dir: Path) -> dict[str, list[str]]:
    """The artifacts of a run as they are now, looked at without changing anything."""
    return inspect(run_dir).artifacts()
