"""Write a small dataset in the platform's format: JSONL + images/ (zip by default).

    python make_sample_dataset.py OUT [--format zip|tar.gz|dir] [--count 12] [--size 128]

Images are generated coloured shapes (no downloads). Most captions live in the
JSONL (`{"images": [{"imageId": ..., "qa": [], "generation": ...}]}`), the last
two images only have `<stem>.txt` captions, and the archive carries the macOS
junk real uploads have (`__MACOSX/`, `._*`, `.DS_Store`).
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import tarfile
import zipfile
from pathlib import Path

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 210, 40),
    "purple": (140, 50, 180),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle")
TXT_ONLY = 2  # the last N images are captioned by .txt files only


def draw_sample(index: int, size: int, rng: random.Random) -> tuple[bytes, str, str]:
    """Return (image bytes, file extension, caption) for one generated sample."""
    from PIL import Image, ImageDraw

    shape = SHAPES[index % len(SHAPES)]
    colour = list(COLOURS)[index % len(COLOURS)]
    background = list(COLOURS)[(index + 3) % len(COLOURS)]
    image = Image.new("RGB", (size, size), COLOURS[background])
    draw = ImageDraw.Draw(image)
    margin = rng.randint(size // 8, size // 4)
    box = (margin, margin, size - margin, size - margin)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    else:
        draw.polygon([(size // 2, margin), (size - margin, size - margin), (margin, size - margin)], fill=COLOURS[colour])
    buffer = io.BytesIO()
    extension = "png" if index % 4 == 3 else "jpg"
    image.save(buffer, format="PNG" if extension == "png" else "JPEG", quality=92)
    caption = f"a {colour} {shape} on a {background} background, simple, flat"
    return buffer.getvalue(), extension, caption


def build_files(count: int, size: int, seed: int, jsonl_name: str) -> dict[str, bytes]:
    """Relative path -> content for the dataset (without junk)."""
    rng = random.Random(seed)
    files: dict[str, bytes] = {}
    lines = []
    for index in range(count):
        data, extension, caption = draw_sample(index, size, rng)
        name = f"{index + 1}_{2000 + index}.{extension}"
        files[f"images/{name}"] = data
        if index >= count - TXT_ONLY:
            files[f"images/{Path(name).stem}.txt"] = caption.encode()
        else:
            lines.append({"images": [{"imageId": name, "qa": [], "generation": caption}]})
    files[jsonl_name] = "".join(json.dumps(line) + "\n" for line in lines).encode()
    return files


def junk_files(files: dict[str, bytes]) -> dict[str, bytes]:
    junk = {".DS_Store": b"\x00\x00\x00\x01Bud1", "images/.DS_Store": b"\x00\x00\x00\x01Bud1"}
    for path in list(files)[:3]:
        parent, _, name = path.rpartition("/")
        prefix = f"{parent}/" if parent else ""
        junk[f"__MACOSX/{prefix}._{name}"] = b"\x00\x05\x16\x07AppleDouble"
        junk[f"{prefix}._{name}"] = b"\x00\x05\x16\x07AppleDouble"
    return junk


def _nested(prefix: str, path: str) -> str:
    """Nest a path under prefix; macOS puts __MACOSX/ at the archive root, mirroring the tree."""
    if path.startswith("__MACOSX/"):
        return "__MACOSX/" + prefix + path[len("__MACOSX/"):]
    return prefix + path


def write_dataset(out: Path, fmt: str = "zip", count: int = 12, size: int = 128, seed: int = 0,
                  jsonl_name: str = "metadata.jsonl", top_folder: str = "", junk: bool = True) -> Path:
    files = build_files(count, size, seed, jsonl_name)
    if junk:
        files.update(junk_files(files))
    prefix = f"{top_folder.strip('/')}/" if top_folder else ""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "zip":
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
            for path, data in files.items():
                info = zipfile.ZipInfo(_nested(prefix, path), date_time=(2024, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                archive.writestr(info, data)
    elif fmt == "tar.gz":
        with tarfile.open(out, "w:gz") as archive:
            for path, data in files.items():
                info = tarfile.TarInfo(_nested(prefix, path))
                info.size = len(data)
                info.mtime = 1_700_000_000
                archive.addfile(info, io.BytesIO(data))
    elif fmt == "dir":
        for path, data in files.items():
            target = out / _nested(prefix, path)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
    else:
        raise ValueError(f"unknown format {fmt!r} (zip, tar.gz or dir)")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--format", choices=("zip", "tar.gz", "dir"), default="zip")
    parser.add_argument("--count", type=int, default=12)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jsonl-name", default="metadata.jsonl")
    parser.add_argument("--top-folder", default="", help="nest everything under this folder")
    parser.add_argument("--no-junk", action="store_true", help="leave out the macOS junk entries")
    args = parser.parse_args(argv)
    path = write_dataset(args.out, args.format, args.count, args.size, args.seed, args.jsonl_name,
                         args.top_folder, junk=not args.no_junk)
    print(f"sample dataset written to {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
