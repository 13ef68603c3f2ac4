"""On-disk caches: one latent file per image (grouped by bucket), one embedding file per distinct caption.

Files are content-addressed (image bytes, caption text, encoder weights, settings), written
atomically, and read lazily during training, so memory does not grow with the dataset and
several runs (or a resumed one) given the same cache folder share what was encoded. Encoding
is split across ranks: each encodes its share of what is missing, then all meet at a barrier.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import load_file, save

log = logging.getLogger("sd_trainer")
CACHE_FORMAT = 2
SAMPLE_BYTES = 1 << 20


def fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def file_sha1(path: Path) -> str:
    digest = hashlib.sha1()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_signature(folder: Path) -> list:
    """Names, sizes and sampled bytes of a model part's files: different weights, different cache."""
    signature = []
    if not folder.is_dir():
        return signature
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        size = path.stat().st_size
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for offset in (0, max(0, size // 2 - SAMPLE_BYTES // 2), max(0, size - SAMPLE_BYTES)):
                handle.seek(offset)
                digest.update(handle.read(SAMPLE_BYTES))
        signature.append((path.name, size, digest.hexdigest()[:16]))
    return signature


def write_atomic(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Serialized in memory and written here: safetensors' own writer raises a SafetensorError, not an
    OSError, when the disk fills. A failed write leaves no temporary file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    data = save({key: value.contiguous() for key, value in tensors.items()})
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
        os.replace(temporary, path)
    except OSError:
        temporary.unlink(missing_ok=True)
        raise


def read(path: Path) -> dict[str, torch.Tensor] | None:
    try:
        return load_file(str(path))
    except Exception as error:  # a half-written or foreign file is a cache miss
        log.warning("ignoring unreadable cache file %s (%s)", path, error)
        return None


class LatentCache:
    """`<root>/<settings>/<W>x<H>/<image key>.safetensors`; an `unreadable/<image key>` marker for broken images."""

    def __init__(self, root: Path, settings: str):
        self.folder = root / f"latents-{settings}"

    def path(self, bucket: tuple[int, int], key: str) -> Path:
        return self.folder / f"{bucket[0]}x{bucket[1]}" / f"{key}.safetensors"

    def unreadable_marker(self, key: str) -> Path:
        return self.folder / "unreadable" / key

    def mark_unreadable(self, key: str) -> None:
        marker = self.unreadable_marker(key)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()


class TextCache:
    """`<root>/<settings>/<caption key>.safetensors` holding `embeds` [L, D] and `pooled` [P]."""

    def __init__(self, root: Path, settings: str):
        self.folder = root / f"text-{settings}"

    @staticmethod
    def key(text: str) -> str:
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]

    def path(self, text: str) -> Path:
        return self.folder / f"{self.key(text)}.safetensors"


class LazyEmbeddings:
    """Prompt embeddings by prompt id, read from the text cache on demand (a few kept in memory)."""

    def __init__(self, paths: list[Path], keep: int = 64):
        self.paths = paths
        self._load = lru_cache(maxsize=keep)(self._read)

    def keep_all(self) -> None:
        """Keep every embedding once read (the caller checked that they fit in memory)."""
        self._load = lru_cache(maxsize=None)(self._read)

    def _read(self, prompt_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        tensors = load_file(str(self.paths[prompt_id]))
        return tensors["embeds"], tensors["pooled"]

    def get(self, prompt_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [self._load(int(i)) for i in prompt_ids]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def my_share(items: list, rank: int, processes: int) -> list:
    """This rank's part of the work: every `processes`-th item."""
    return items[rank::processes]
