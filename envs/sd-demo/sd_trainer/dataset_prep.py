"""Turn the platform's dataset (zip, tar.gz or directory) into SimpleTuner's `textfile` layout.

Input: a JSONL file (any single `*.jsonl`) plus images (usually in `images/`), possibly
nested some folders deep, possibly with `<stem>.txt` captions and macOS junk.
Output: a flat directory of `name.<ext>` images, each next to `name.txt`, and a
`_prep_report.json` the trainer folds into its `dataset` event.

Only the standard library and Pillow are used, so the entry script can run this
before any heavy import. Every failure is a `DatasetError` with a one-line message.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import tarfile
import zipfile
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
JUNK_NAMES = {".ds_store", "thumbs.db", "desktop.ini"}
JUNK_DIRS = {"__macosx"}
PREFERRED_JSONL = ("metadata.jsonl", "output.jsonl", "data.jsonl")
# keys that name an image file in a JSONL record, most specific first
IMAGE_KEYS = ("imageid", "image_id", "file_name", "filename", "image_path", "image", "img", "file", "path")
# keys that hold a caption, most specific first (`qa` and boxes are deliberately not captions)
CAPTION_KEYS = ("generation", "caption", "text", "prompt", "description", "tags")
IMAGE_LIST_KEYS = ("images", "imgs", "image_list")
REPORT_NAME = "_prep_report.json"
# T5 reads 154 tokens and CLIP 77: nothing past a few thousand characters reaches the model, and
# an unbounded caption (5 MB seen) would flood logs and configs.
MAX_CAPTION_CHARS = int(os.environ.get("SD_DEMO_MAX_CAPTION_CHARS") or 2000)
EXAMPLES_KEPT = 5
CHUNK = 1 << 20


class DatasetError(Exception):
    """A dataset problem the user must fix; the message is one line and names the file."""


@dataclass
class Limits:
    """Guards against zip bombs; overridable with SD_DEMO_MAX_DATASET_BYTES / SD_DEMO_MAX_COMPRESSION_RATIO."""

    max_total_bytes: int = 20 * 1024**3
    max_ratio: float = 100.0
    ratio_applies_above: int = 16 * 1024**2  # small archives of text compress well legitimately
    max_entries: int = 500_000

    @classmethod
    def from_env(cls) -> "Limits":
        limits = cls()
        if os.environ.get("SD_DEMO_MAX_DATASET_BYTES"):
            limits.max_total_bytes = int(os.environ["SD_DEMO_MAX_DATASET_BYTES"])
        if os.environ.get("SD_DEMO_MAX_COMPRESSION_RATIO"):
            limits.max_ratio = float(os.environ["SD_DEMO_MAX_COMPRESSION_RATIO"])
        return limits


@dataclass
class PrepReport:
    source: str
    jsonl: str | None = None
    images: int = 0
    captions_from_jsonl: int = 0
    captions_from_txt: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def skip(self, reason: str, name: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        kept = self.examples.setdefault(reason, [])
        if len(kept) < EXAMPLES_KEPT:
            kept.append(name)

    def describe(self, reason: str) -> str:
        names = ", ".join(self.examples.get(reason, []))
        more = self.skipped[reason] - len(self.examples.get(reason, []))
        return names + (f" and {more} more" if more > 0 else "")


# ---------------------------------------------------------------- paths and junk


def is_junk(relative: str) -> bool:
    """macOS / Windows metadata that is never data: __MACOSX/, ._*, .DS_Store, Thumbs.db."""
    parts = PurePosixPath(relative).parts
    if any(part.lower() in JUNK_DIRS for part in parts[:-1]):
        return True
    name = parts[-1] if parts else ""
    return name.startswith("._") or name.lower() in JUNK_NAMES or name.lower() in JUNK_DIRS


def safe_relative(name: str, archive: Path) -> str:
    """An archive member name as a clean relative path, or DatasetError if it escapes."""
    cleaned = name.replace("\\", "/")
    if cleaned.startswith("/") or re.match(r"^[A-Za-z]:", cleaned):
        raise DatasetError(f"{archive}: entry {name!r} has an absolute path; refusing to extract it")
    parts = [part for part in cleaned.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise DatasetError(f"{archive}: entry {name!r} points outside the archive (zip-slip); refusing to extract it")
    return "/".join(parts)


def link_escapes(relative: str, target: str) -> bool:
    """True if a link at `relative` pointing to `target` resolves outside the extraction root."""
    target = target.replace("\\", "/")
    if target.startswith("/") or re.match(r"^[A-Za-z]:", target):
        return True
    depth = 0
    for part in list(PurePosixPath(relative).parent.parts) + target.split("/"):
        if part in ("", "."):
            continue
        depth += -1 if part == ".." else 1
        if depth < 0:
            return True
    return False


# ---------------------------------------------------------------- extraction


def _archive_kind(path: Path) -> str | None:
    with path.open("rb") as handle:
        head = handle.read(512)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08"):
        return "zip"
    if head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head[:6] == b"\xfd7zXZ\x00":
        return "tar"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    return None


class _Budget:
    """Counts bytes actually written, so lying headers cannot exceed the limits."""

    def __init__(self, archive: Path, limits: Limits):
        self.archive, self.limits, self.written = archive, limits, 0
        self.archive_size = max(archive.stat().st_size, 1)

    def check_declared(self, total: int) -> None:
        if total > self.limits.max_total_bytes:
            raise DatasetError(
                f"{self.archive}: uncompressed size {total} bytes exceeds the limit of "
                f"{self.limits.max_total_bytes} bytes (SD_DEMO_MAX_DATASET_BYTES); refusing to extract"
            )
        self._check_ratio(total)

    def _check_ratio(self, total: int) -> None:
        if total > self.limits.ratio_applies_above and total / self.archive_size > self.limits.max_ratio:
            raise DatasetError(
                f"{self.archive}: expands {total / self.archive_size:.0f}x (limit {self.limits.max_ratio:.0f}x, "
                "SD_DEMO_MAX_COMPRESSION_RATIO); looks like a zip bomb, refusing to extract"
            )

    def copy(self, source, destination: Path, declared: int | None) -> None:
        with destination.open("xb") as out:
            copied = 0
            while chunk := source.read(CHUNK):
                copied += len(chunk)
                self.written += len(chunk)
                if declared is not None and copied > declared:
                    raise DatasetError(f"{self.archive}: entry {destination.name} is larger than its header says; corrupt or malicious archive")
                self.check_declared(self.written)
                out.write(chunk)


def _target_path(root: Path, relative: str) -> Path:
    destination = root / relative
    if not destination.resolve().is_relative_to(root.resolve()):
        raise DatasetError(f"entry {relative!r} resolves outside the extraction directory; refusing")
    destination.parent.mkdir(parents=True, exist_ok=True)
    return destination


def extract_zip(archive: Path, root: Path, limits: Limits, report: PrepReport) -> None:
    try:
        with zipfile.ZipFile(archive) as handle:
            infos = handle.infolist()
            if len(infos) > limits.max_entries:
                raise DatasetError(f"{archive}: {len(infos)} entries exceed the limit of {limits.max_entries}")
            budget = _Budget(archive, limits)
            budget.check_declared(sum(info.file_size for info in infos))
            for info in infos:
                relative = safe_relative(info.filename, archive)
                if not relative or is_junk(relative):
                    continue
                mode = info.external_attr >> 16
                if stat.S_ISLNK(mode):
                    target = handle.read(info).decode("utf-8", "replace")
                    if link_escapes(relative, target):
                        raise DatasetError(f"{archive}: entry {info.filename!r} is a symlink to {target!r} outside the archive; refusing to extract")
                    report.skip("symlink", relative)
                    continue
                if info.is_dir():
                    _target_path(root, relative).mkdir(exist_ok=True)
                    continue
                destination = _target_path(root, relative)
                if destination.exists():
                    report.skip("duplicate_entry", relative)
                    continue
                with handle.open(info) as source:
                    budget.copy(source, destination, info.file_size)
    except DatasetError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as error:
        raise DatasetError(f"{archive}: corrupt zip archive ({error})") from None


def extract_tar(archive: Path, root: Path, limits: Limits, report: PrepReport) -> None:
    budget = _Budget(archive, limits)
    declared, entries = 0, 0
    try:
        with tarfile.open(archive, "r:*") as handle:
            for member in handle:
                entries += 1
                if entries > limits.max_entries:
                    raise DatasetError(f"{archive}: more than {limits.max_entries} entries; refusing to extract")
                relative = safe_relative(member.name, archive)
                if not relative or is_junk(relative):
                    continue
                if member.issym() or member.islnk():
                    if member.issym():
                        escapes = link_escapes(relative, member.linkname)
                    else:
                        escapes = _hardlink_escapes(member.linkname)
                    if escapes:
                        raise DatasetError(f"{archive}: entry {member.name!r} links to {member.linkname!r} outside the archive; refusing to extract")
                    report.skip("symlink", relative)
                    continue
                if member.isdir():
                    _target_path(root, relative).mkdir(exist_ok=True)
                    continue
                if not member.isfile():
                    report.skip("special_file", relative)
                    continue
                declared += member.size
                budget.check_declared(declared)
                destination = _target_path(root, relative)
                if destination.exists():
                    report.skip("duplicate_entry", relative)
                    continue
                source = handle.extractfile(member)
                budget.copy(source, destination, member.size)
    except DatasetError:
        raise
    except (tarfile.TarError, zlib.error, EOFError, OSError) as error:
        raise DatasetError(f"{archive}: corrupt tar archive ({error})") from None


def _hardlink_escapes(target: str) -> bool:
    # hard-link targets are archive-root relative
    try:
        safe_relative(target, Path("."))
    except DatasetError:
        return True
    return False


# ---------------------------------------------------------------- JSONL captions


def _lower_keys(record: dict) -> dict:
    return {str(key).lower(): value for key, value in record.items()}


def _caption_of(record: dict) -> str | None:
    for key in CAPTION_KEYS:
        value = record.get(key)
        if isinstance(value, str) and value.strip():
            return value
        if isinstance(value, list) and value and all(isinstance(item, str) for item in value):
            return ", ".join(item for item in value if item.strip()) or None
    return None


def _image_ref_of(record: dict) -> str | None:
    for key in IMAGE_KEYS:
        value = record.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def parse_jsonl_line(record: object) -> list[tuple[str, str | None]]:
    """(image reference, caption or None) pairs of one JSONL record; [] if it names no image."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    record = _lower_keys(record)
    line_caption = _caption_of(record)
    pairs: list[tuple[str, str | None]] = []
    for list_key in IMAGE_LIST_KEYS:
        items = record.get(list_key)
        if isinstance(items, str):
            items = [items]
        if not isinstance(items, list):
            continue
        for item in items:
            if isinstance(item, str) and item.strip():
                pairs.append((item.strip(), line_caption))
            elif isinstance(item, dict):
                item = _lower_keys(item)
                reference = _image_ref_of(item)
                if reference:
                    pairs.append((reference, _caption_of(item) or line_caption))
    if not pairs:
        reference = _image_ref_of(record)
        if reference:
            pairs.append((reference, line_caption))
    return pairs


def read_jsonl(path: Path, display: str) -> list[tuple[int, str, str | None]]:
    """(line number, image reference, caption) for every image named in the JSONL file."""
    entries = []
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        line = path.read_bytes()[: error.start].count(b"\n") + 1
        raise DatasetError(f"{display} line {line}: not valid UTF-8") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            pairs = parse_jsonl_line(json.loads(line))
        except (json.JSONDecodeError, ValueError) as error:
            raise DatasetError(f"{display} line {number}: invalid JSON record ({error})") from None
        if not pairs:
            raise DatasetError(
                f"{display} line {number}: names no image (expected e.g. "
                '{"images": [{"imageId": "a.jpg", "generation": "caption"}]})'
            )
        entries.extend((number, reference, caption) for reference, caption in pairs)
    return entries


# ---------------------------------------------------------------- scanning


def _walk(root: Path, report: PrepReport) -> list[str]:
    """Non-junk regular files under root as posix relative paths; links leaving root are skipped."""
    real_root = root.resolve()
    found = []
    for directory, subdirs, files in os.walk(root, followlinks=False):
        subdirs[:] = sorted(d for d in subdirs if d.lower() not in JUNK_DIRS)
        for name in sorted(files):
            path = Path(directory) / name
            relative = path.relative_to(root).as_posix()
            if is_junk(relative):
                continue
            if path.is_symlink() and not path.resolve().is_relative_to(real_root):
                report.skip("symlink_outside", relative)
                continue
            if path.is_file():
                found.append(relative)
    return found


def _pick_jsonl(files: list[str], source: Path) -> str | None:
    candidates = [f for f in files if f.lower().endswith(".jsonl")]
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    shallowest = min(len(PurePosixPath(f).parts) for f in candidates)
    candidates = [f for f in candidates if len(PurePosixPath(f).parts) == shallowest]
    for preferred in PREFERRED_JSONL:
        named = [f for f in candidates if PurePosixPath(f).name.lower() == preferred]
        if len(named) == 1:
            return named[0]
    if len(candidates) == 1:
        return candidates[0]
    raise DatasetError(f"{source}: several JSONL files ({', '.join(candidates)}); keep exactly one")


class _ImageIndex:
    """Finds an image by the reference a JSONL line uses (relative path or bare file name, any case)."""

    def __init__(self, images: list[str], base: str):
        self.by_path: dict[str, str] = {}
        self.by_name: dict[str, list[str]] = {}
        for image in images:
            self.by_path[image.lower()] = image
            if base and image.lower().startswith(base.lower() + "/"):
                self.by_path.setdefault(image[len(base) + 1 :].lower(), image)
            self.by_name.setdefault(PurePosixPath(image).name.lower(), []).append(image)
        self.base = base

    def find(self, reference: str) -> str | None:
        cleaned = reference.replace("\\", "/").split("?")[0].strip()
        cleaned = re.sub(r"^(\./)+", "", cleaned).lower()
        for key in (cleaned, f"images/{cleaned}"):
            if key in self.by_path:
                return self.by_path[key]
        matches = self.by_name.get(PurePosixPath(cleaned).name, [])
        return matches[0] if len(matches) == 1 else None


def _readable_image(path: Path) -> str | None:
    """None if Pillow can fully decode the image, else the reason."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            if image.width < 1 or image.height < 1:
                return "empty image"
    except Exception as error:  # Pillow raises many types for broken files
        return f"{type(error).__name__}: {error}"
    return None


def _clean_caption(caption: str) -> str:
    return re.sub(r"\s+", " ", caption).strip()


def cap_caption(caption: str, limit: int | None = None) -> tuple[str, bool]:
    """(caption cut to `limit` characters at a word boundary when possible, whether it was cut)."""
    limit = limit or MAX_CAPTION_CHARS
    if len(caption) <= limit:
        return caption, False
    head = caption[:limit]
    space = head.rfind(" ")
    return (head[:space] if space > limit // 2 else head).rstrip(" ,"), True


def _output_name(relative: str, taken_stems: set[str]) -> str:
    """A flat, safe, unique file name; unique by stem because the caption is `<stem>.txt`."""
    path = PurePosixPath(relative)
    base = re.sub(r"[^\w.-]", "_", path.stem).strip("._") or "image"
    stem, counter = base, 2
    while stem.lower() in taken_stems:
        stem = f"{base}-{counter}"
        counter += 1
    taken_stems.add(stem.lower())
    return stem + path.suffix.lower()


# ---------------------------------------------------------------- entry point


def prepare_dataset(source: Path, destination: Path, scratch: Path, limits: Limits | None = None) -> PrepReport:
    """Extract/scan `source` and write the textfile layout into `destination` (replaced)."""
    source = Path(source)
    limits = limits or Limits.from_env()
    report = PrepReport(source=str(source))
    root = _unpacked_root(source, Path(scratch), limits, report)
    files = _walk(root, report)
    if not files:
        raise DatasetError(f"dataset {source} is empty (nothing but macOS/Windows metadata, if anything)")
    images = [f for f in files if PurePosixPath(f).suffix.lower() in IMAGE_EXTENSIONS]
    if not images:
        raise DatasetError(f"dataset {source} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    jsonl_captions = _jsonl_captions(source, root, files, images, report)
    text_files = {f.lower(): f for f in files if f.lower().endswith(".txt")}
    if destination.exists():
        shutil.rmtree(destination)
    destination.mkdir(parents=True)
    cut = _write_images(root, images, jsonl_captions, text_files, destination, report)
    if report.images == 0:
        if report.skipped.get("no_caption"):
            raise DatasetError(
                f"dataset {source}: none of {len(images)} images has a caption (no JSONL caption, no .txt), "
                f"e.g. {report.describe('no_caption')}"
            )
        raise DatasetError(
            f"dataset {source}: all {len(images)} images are unreadable or truncated, e.g. {report.describe('unreadable')}"
        )
    if cut:  # named by file, never printed: a caption can be megabytes
        report.warnings.append(f"{len(cut)} caption(s) longer than {MAX_CAPTION_CHARS} characters were cut "
                               f"(e.g. {', '.join(cut[:3])})")
    for reason in sorted(report.skipped):
        report.warnings.append(f"skipped {report.skipped[reason]} ({reason.replace('_', ' ')}): {report.describe(reason)}")
    (destination / REPORT_NAME).write_text(json.dumps(asdict(report), indent=1), encoding="utf-8")
    return report


def _unpacked_root(source: Path, scratch: Path, limits: Limits, report: PrepReport) -> Path:
    """The folder to scan: `source` itself, or `scratch`/extracted with the archive unpacked into it."""
    if not source.exists():
        raise DatasetError(f"dataset {source} does not exist")
    if source.is_dir():
        return source
    if source.stat().st_size == 0:
        raise DatasetError(f"dataset {source} is an empty file")
    kind = _archive_kind(source)
    if kind is None:
        raise DatasetError(f"dataset {source} is not a zip, a tar.gz or a directory")
    root = scratch / "extracted"
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    (extract_zip if kind == "zip" else extract_tar)(source, root, limits, report)
    return root


def _jsonl_captions(source: Path, root: Path, files: list[str], images: list[str], report: PrepReport) -> dict[str, str]:
    """{image: caption} from the dataset's JSONL file, if it has one (the first caption of an image wins)."""
    jsonl = _pick_jsonl(files, source)
    captions: dict[str, str] = {}
    if not jsonl:
        return captions
    report.jsonl = jsonl
    base = str(PurePosixPath(jsonl).parent)
    index = _ImageIndex(images, "" if base == "." else base)
    entries = read_jsonl(root / jsonl, f"{source}:{jsonl}" if not source.is_dir() else str(root / jsonl))
    for _line, reference, caption in entries:
        image = index.find(reference)
        if image is None:
            report.skip("listed_but_missing", reference)
        elif caption and _clean_caption(caption) and image not in captions:
            captions[image] = _clean_caption(caption)
    return captions


def _write_images(root: Path, images: list[str], jsonl_captions: dict[str, str], text_files: dict[str, str],
                  destination: Path, report: PrepReport) -> list[str]:
    """Each readable image with a caption (JSONL first, else its .txt) copied with its caption; the cut ones."""
    taken: set[str] = set()
    cut: list[str] = []
    for image in images:
        caption = jsonl_captions.get(image)
        if caption:
            origin = "jsonl"
        else:
            text = text_files.get(str(PurePosixPath(image).with_suffix(".txt")).lower())
            caption = _clean_caption((root / text).read_text(encoding="utf-8-sig", errors="replace")) if text else ""
            origin = "txt"
        caption, was_cut = cap_caption(caption)
        if was_cut:
            cut.append(image)
        if not caption:
            report.skip("no_caption", image)
            continue
        if _readable_image(root / image):
            report.skip("unreadable", image)
            continue
        name = _output_name(image, taken)
        shutil.copyfile(root / image, destination / name)
        (destination / name).with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
        report.images += 1
        if origin == "jsonl":
            report.captions_from_jsonl += 1
        else:
            report.captions_from_txt += 1
    return cut
