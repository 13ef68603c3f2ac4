"""How a run sees its dataset: `dataset_mode` in a method's spec.

- "archive": the dataset as given (a zip, a tar.gz or a folder), mounted read-only.
- "extracted": an archive extracted safely (archive.extract: no entry or link leaves the folder, no
  special files, size-capped, macOS junk dropped) into `<run_dir>/dataset/`, mounted read-only.
- "writable": extracted (a folder: copied) into the run's `work/dataset/`, owned by the run's user and
  mounted read-write, for tools that write an index beside the images.

An archive made of one top folder (as zipping a folder makes it) is mounted from inside it
(`dataset_root`). Default: a built-in method gets its dataset as given ("archive"); an added method gets an archive
extracted ("extracted") and a folder as given. Nothing is ever written under <base>/datasets; an
extracted copy belongs to its run (a resumed run keeps it).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from envmgr.core import archive, paths
from envmgr.core.errors import UsageError
from envmgr.core.spec import MethodSpec
from envmgr.runs import owned

EXTRACTED = "dataset"      # <run_dir>/dataset (read-only) or <run_dir>/work/dataset (writable)
_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")


@dataclass(frozen=True)
class RunDataset:
    mode: str          # "archive", "extracted" or "writable"
    name: str          # its name under /envmgr/data
    path: Path         # what is mounted (the host's file or folder)

    @property
    def target(self) -> str:
        return f"{paths.CONTAINER_DATA}/{self.name}"

    @property
    def read_only(self) -> bool:
        return self.mode != "writable"


def default_mode(spec: MethodSpec, dataset: Path) -> str:
    """The mode when the spec names none: an added method gets an archive extracted, anything else as given."""
    if spec.builtin or dataset.is_dir():
        return "archive"
    return "extracted"


def _stem(dataset: Path) -> str:
    for suffix in _SUFFIXES:
        if dataset.name.lower().endswith(suffix) and len(dataset.name) > len(suffix):
            return dataset.name[: -len(suffix)]
    return dataset.name


def prepare_dataset(spec: MethodSpec, dataset: Path, run_dir: Path, work: Path, user: str,
                    mode: str | None = None) -> RunDataset:
    """The dataset as the run sees it, extracted or copied for the run when its mode asks for it."""
    mode = mode or spec.dataset_mode or default_mode(spec, dataset)
    if mode == "archive":
        return RunDataset(mode, dataset.name, dataset)
    if mode == "extracted" and dataset.is_dir():
        return RunDataset(mode, dataset.name, dataset)    # a folder is already extracted: mounted as given
    name = _stem(dataset)
    # relative to the run dir, every level checked without following a link: work/ is the method's
    root = PurePosixPath(work.relative_to(run_dir).as_posix() if mode == "writable" else "", EXTRACTED)
    if not owned.is_folder(run_dir, root / name):   # a resumed run keeps the copy its method may have written to
        owned.ensure_folder(run_dir, root)
        # one folder per extraction: Slurm ranks on one machine share the run dir; the first rename wins
        partial = Path(tempfile.mkdtemp(dir=run_dir / root, prefix=f".{name}.partial-"))
        try:
            archive.extract(dataset, partial)
            _give(run_dir, root / partial.name, user, writable=mode == "writable")
            partial.rename(run_dir / root / name)
        except OSError:
            if not owned.is_folder(run_dir, root / name):
                raise
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    dest = run_dir / root / name
    return RunDataset(mode, name, dest if dataset.is_dir() else dataset_root(dest))


def dataset_root(folder: Path) -> Path:
    """Where an extracted archive's dataset starts: inside the one folder zipping a folder makes, and further
    down through single folders while the next one still holds folders (`pets/images/*.jpg` -> `pets`)."""
    def only_folder(path: Path) -> Path | None:
        entries = [p for p in path.iterdir() if not archive.is_junk(p.name)]
        return entries[0] if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink() else None

    top = only_folder(folder)
    if top is None:
        return folder
    while (inner := only_folder(top)) is not None and any(p.is_dir() for p in inner.iterdir()):
        top = inner
    return top


def _give(run_dir: Path, folder: PurePosixPath, user: str, writable: bool) -> None:
    """Readable by the run's user; for a writable dataset, owned by it and writable (owned.give: no link followed)."""
    uid, gid = (int(x) for x in user.split(":"))
    owned.give(run_dir, folder, (uid, gid) if writable else None,
               dir_bits=0o755 | (0o700 if writable else 0), file_bits=0o644 | (0o600 if writable else 0))


def recorded(entry: dict, run_dir: Path) -> RunDataset:
    """The dataset a run's record describes, as it is mounted: its copy in the run dir, or the file as given
    (a scheduler's container runtime mounts it from the record; a copy outside the run dir is refused)."""
    mode = entry.get("mode") or "archive"
    target = entry.get("mounted_at") or f"{paths.CONTAINER_DATA}/{entry['name']}"
    copy = entry.get("copy")
    if not copy:
        return RunDataset(mode, target.rsplit("/", 1)[-1], Path(entry["path"]))
    if not isinstance(copy, str) or PurePosixPath(copy).is_absolute() or ".." in PurePosixPath(copy).parts:
        raise UsageError(f"the run record's dataset copy ({copy!r}) is not inside {run_dir}; envmgr will not mount it")
    return RunDataset(mode, target.rsplit("/", 1)[-1], owned.mount_source(run_dir, copy))   # no link on its way


def record(prepared: RunDataset, run_dir: Path) -> dict[str, str]:
    """What run.json says about how the dataset was handed to the run."""
    where = str(prepared.path.relative_to(run_dir)) if prepared.path.is_relative_to(run_dir) else None
    return {"mode": prepared.mode, "mounted_at": prepared.target, **({"copy": where} if where else {})}



