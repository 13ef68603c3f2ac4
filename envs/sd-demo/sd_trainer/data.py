"""Training data: find image/caption pairs, bucket them by aspect, cache latents + text embeddings once.

After `build_training_set` returns, the VAE and the three text encoders are gone from
memory and every latent and prompt embedding lives in its own file (`cache.py`); a
training step reads only the files of its batch. A batch always comes from one bucket.
When the files fit the RAM budget they are read once and kept (`TrainingSet.hold_in_memory`);
`ReadAhead` prepares the coming steps' batches in a background thread.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import random
import threading
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import buckets, cache, model
from .config import ImageBackend, TrainConfig
from .dataset_prep import IMAGE_EXTENSIONS, MAX_CAPTION_CHARS, REPORT_NAME, cap_caption, is_junk

log = logging.getLogger("sd_trainer")
TEXT_ENCODER_PARTS = ("text_encoder", "text_encoder_2", "text_encoder_3")


class DataError(Exception):
    """The training data cannot be used; one line naming the folder or the filter."""


@dataclass
class Sample:
    path: Path
    caption: str
    repeats: int = 0
    backend: ImageBackend | None = None
    key: str = ""  # content + crop settings: the name of its latent file
    bucket: tuple[int, int] = (0, 0)
    downsample_to: float | None = None


@dataclass
class TrainingSet:
    """Per sample: its latent file and caption id. Tensors are read per batch, never all at once."""

    latent_files: list[Path]
    buckets: list[tuple[int, int]]
    caption_ids: torch.Tensor  # [N] index into prompts
    prompts: list[str]  # distinct texts; EMPTY_PROMPT_ID is "" (caption dropout, negative prompt)
    embeddings: cache.LazyEmbeddings
    order: torch.Tensor  # sample index per epoch position, repeats expanded
    report: dict = field(default_factory=dict)
    _ids: dict[str, int] = field(default_factory=dict)
    _kept: dict[int, dict[str, torch.Tensor]] | None = None  # sample -> its latent file's tensors, once read

    def __post_init__(self):
        self._ids = {text: number for number, text in enumerate(self.prompts)}

    def prompt_id(self, text: str) -> int:
        return self._ids[text]

    def hold_in_memory(self, budget_mb: int) -> int | None:
        """Keep every latent and embedding once read when their cache files total at most `budget_mb` MiB.

        Returns their total size in bytes when they fit (None when not: then each batch reads its files,
        and at most a few embeddings stay in memory). Nothing is read here: the first epoch fills it.
        """
        paths = set(self.latent_files) | set(self.embeddings.paths)
        total = sum(path.stat().st_size for path in paths)
        if total > budget_mb * 2**20:
            return None
        self._kept = {}
        self.embeddings.keep_all()
        return total

    def latents(self, indices: torch.Tensor, flip: torch.Tensor | None = None) -> torch.Tensor:
        """[B, C, h, w] fp32 latents of one bucket; `flip` picks the mirrored image's latent per sample."""
        loaded = []
        kept = self._kept
        for position, index in enumerate(indices.tolist()):
            tensors = kept.get(index) if kept is not None else None
            if tensors is None:
                tensors = cache.read(self.latent_files[index])
                if tensors is None:
                    raise DataError(f"latent cache file {self.latent_files[index]} vanished or is damaged during training")
                if kept is not None:
                    kept[index] = tensors
            mirrored = flip is not None and bool(flip[position])
            loaded.append(tensors["flipped" if mirrored else "latent"])
        return torch.stack(loaded)

    def prompt_embeddings(self, prompt_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.embeddings.get(prompt_ids)


EMPTY_PROMPT_ID = 0


@dataclass
class Batch:
    """One micro-batch as the transformer takes it, computed on the CPU before its step."""

    noisy: torch.Tensor  # (1 - sigma) * latents + sigma * noise, fp32
    target: torch.Tensor  # noise - latents, fp32
    timesteps: torch.Tensor  # sigma * 1000
    prompt_embeds: torch.Tensor
    pooled_embeds: torch.Tensor

    def pin_memory(self) -> Batch:
        """Page-locked copies: the host-to-GPU copies of the step can then run asynchronously."""
        return Batch(*(tensor.pin_memory() for tensor in (self.noisy, self.target, self.timesteps, self.prompt_embeds,
                                                          self.pooled_embeds)))


class ReadAhead:
    """`prepare(key)` for each key in order, at most `depth` keys ahead, in one background thread.

    `get(key)` hands the prepared value over (or raises what `prepare` raised for that key).
    `prepare` must depend on its key only (the trainer's batches and noise are functions of
    (seed, step, micro-batch, rank)), so a value prepared ahead is the one `get` would have
    computed itself. `depth=0`: no thread, `get` prepares on the caller's thread.

    The slot of a value handed over is given back to the worker by `resume()` (or by the next
    `get`): the trainer calls it just before backward, which runs without the GIL, so the
    worker's Python work does not compete with the forward pass for it.
    """

    def __init__(self, prepare: Callable[[Hashable], object], keys: Iterable[Hashable], depth: int):
        self.prepare, self.depth = prepare, depth
        self._queue: queue.Queue = queue.Queue()  # bounded by the slots
        self._slots = threading.Semaphore(depth)
        self._owed = 0  # slots of values handed over and not given back yet
        self._closed = threading.Event()
        self._thread = None
        if depth > 0:
            self._thread = threading.Thread(target=self._run, args=(iter(keys),), name="sd-trainer-read-ahead",
                                            daemon=True)
            self._thread.start()

    def _run(self, keys) -> None:
        for key in keys:
            while not self._slots.acquire(timeout=0.2):
                if self._closed.is_set():
                    return
            if self._closed.is_set():
                return
            try:
                item = (key, self.prepare(key), None)
            except BaseException as error:  # noqa: BLE001 - handed to the step that needs this batch
                item = (key, None, error)
            self._queue.put(item)
            if item[2] is not None:
                return

    def get(self, key: Hashable):
        if self._thread is None:
            return self.prepare(key)
        self.resume()
        while True:
            try:
                got, value, error = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError(f"read-ahead ended before {key}") from None
        self._owed += 1
        if got != key:
            raise RuntimeError(f"read-ahead out of order: asked for {key}, next prepared is {got}")
        if error is not None:
            raise error
        return value

    def resume(self) -> None:
        """Let the worker prepare the next values now (the caller is about to run without the GIL)."""
        while self._owed:
            self._owed -= 1
            self._slots.release()

    def close(self) -> None:
        self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout=30)


# ---------------------------------------------------------------- discovery


def discover(config: TrainConfig, report: dict) -> list[Sample]:
    samples: list[Sample] = []
    cut: list[str] = []
    for backend in config.image_backends:
        folder = backend.instance_data_dir
        if not folder.is_dir():
            raise DataError(f"instance_data_dir {folder} (backend {backend.id}) does not exist")
        found: list[Sample] = []
        images = 0
        for path in sorted(folder.rglob("*")):
            relative = path.relative_to(folder).as_posix()
            if not path.is_file() or path.suffix.lower() not in IMAGE_EXTENSIONS or is_junk(relative):
                continue
            images += 1
            caption, was_cut = cap_caption(_caption(path, backend))
            if was_cut:
                cut.append(relative)
            if not caption:
                _skip(report, "no_caption", relative)
                continue
            found.append(Sample(path, _with_instance_prompt(caption, backend), backend.repeats, backend))
        if images == 0:
            raise DataError(f"instance_data_dir {folder} (backend {backend.id}) holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        if backend.max_num_samples and len(found) > backend.max_num_samples:
            chosen = sorted(random.Random(config.seed).sample(range(len(found)), backend.max_num_samples))
            found = [found[i] for i in chosen]
        samples.extend(found)
    if cut:  # one warning, never the caption itself: captions can be megabytes
        log.warning("%d caption(s) longer than %d characters were cut to that length (e.g. %s)",
                    len(cut), MAX_CAPTION_CHARS, ", ".join(cut[:3]))
    return samples


def _caption(path: Path, backend: ImageBackend) -> str:
    if backend.caption_strategy == "instanceprompt" or backend.only_instance_prompt:
        return (backend.instance_prompt or "").strip()
    if backend.caption_strategy == "filename":
        return path.stem.replace("_", " ").strip()
    text = path.with_suffix(".txt")
    if not text.is_file():
        return ""
    return " ".join(text.read_text(encoding="utf-8-sig", errors="replace").split())


def _with_instance_prompt(caption: str, backend: ImageBackend) -> str:
    """The trigger word (instance_prompt) first, once."""
    trigger = (backend.instance_prompt or "").strip()
    if not backend.prepend_instance_prompt or not trigger or caption == trigger or caption.startswith(trigger + ","):
        return caption
    return f"{trigger}, {caption}"


def _skip(report: dict, reason: str, name: str) -> None:
    report.setdefault("skipped", {})
    report["skipped"][reason] = report["skipped"].get(reason, 0) + 1
    examples = report.setdefault("examples", {}).setdefault(reason, [])
    if len(examples) < 5:
        examples.append(name)


# ---------------------------------------------------------------- sizing


def assign_buckets(config: TrainConfig, samples: list[Sample], report: dict) -> list[Sample]:
    """Read each image's header: filter by minimum/maximum size, pick its bucket and cache key."""
    alignment = buckets.alignment_for(config.resolution, config.aspect_bucket_alignment)
    kept = []
    for sample in samples:
        backend = sample.backend
        size = buckets.image_size(sample.path)
        if size is None:
            _skip(report, "unreadable", sample.path.name)
            continue
        measure = buckets.size_measure(*size, backend.resolution_type)
        minimum = backend.minimum_image_size or config.minimum_image_size
        if minimum and measure < minimum:
            _skip(report, "too_small", sample.path.name)
            continue
        if backend.maximum_image_size and measure > backend.maximum_image_size:
            sample.downsample_to = float(backend.target_downsample_size or backend.maximum_image_size)
            size = tuple(max(1, round(side * sample.downsample_to / measure)) for side in size)
            report["downsampled"] = report.get("downsampled", 0) + 1
        sample.bucket = buckets.bucket_for(*size, backend, config.resolution, alignment)
        if max(sample.bucket[0] / size[0], sample.bucket[1] / size[1]) > 1:
            report["upscaled"] = report.get("upscaled", 0) + 1
        sample.key = cache.fingerprint(cache.file_sha1(sample.path), sample.bucket, backend.crop, backend.crop_style,
                                       backend.crop_aspect, sample.downsample_to, config.random_flip)
        kept.append(sample)
    return kept


# ---------------------------------------------------------------- caching


def _cache_root(config: TrainConfig, kind: str) -> Path:
    if kind == "vae":
        configured = next((b.cache_dir_vae for b in config.image_backends if b.cache_dir_vae), None)
    else:
        configured = config.text_cache_dir
    return configured or Path(config.output_dir) / ".cache" / kind


def _encode_latents(config, work: list[Sample], latent_cache: cache.LatentCache, device, dtype, stop) -> bool:
    """Encode this rank's share, bucket by bucket; False if stopped by a signal."""
    vae = model.load_vae(config.pretrained_model_name_or_path, dtype, device)
    by_bucket: dict[tuple[int, int], list[Sample]] = {}
    for sample in work:
        by_bucket.setdefault(sample.bucket, []).append(sample)
    for bucket, members in by_bucket.items():
        for start in range(0, len(members), config.vae_batch_size):
            if stop():
                return False
            batch, pixels = [], []
            for sample in members[start : start + config.vae_batch_size]:
                image, _status = buckets.load_pixels(sample.path, bucket, sample.backend, sample.key, sample.downsample_to)
                if image is None:
                    latent_cache.mark_unreadable(sample.key)
                    continue
                batch.append(sample)
                pixels.append(image)
            if not batch:
                continue
            stacked = torch.stack(pixels)
            latents = model.encode_images(vae, stacked)
            flipped = model.encode_images(vae, stacked.flip(-1)) if config.random_flip else None
            for number, sample in enumerate(batch):
                tensors = {"latent": latents[number]}
                if flipped is not None:
                    tensors["flipped"] = flipped[number]
                cache.write_atomic(latent_cache.path(bucket, sample.key), tensors)
    del vae
    model.release_memory()
    return True


def _encode_prompts(config, work: list[str], text_cache: cache.TextCache, device, dtype, stop) -> bool:
    pipeline = model.load_text_pipeline(Path(config.pretrained_model_name_or_path), dtype, device)
    for start in range(0, len(work), 8):
        if stop():
            return False
        chunk = work[start : start + 8]
        embeds, pooled = model.encode_prompts(pipeline, chunk, config.tokenizer_max_length, device, config.t5_padding)
        for number, text in enumerate(chunk):
            cache.write_atomic(text_cache.path(text), {"embeds": embeds[number], "pooled": pooled[number]})
    del pipeline
    model.release_memory()
    return True


def _machines() -> int:
    """Machines in this run (train.sh's TRAINING_NUM_MACHINES): each may have a cache folder of its own."""
    value = os.environ.get("TRAINING_NUM_MACHINES", "1")
    return int(value) if value.isdigit() else 1


def build_training_set(config: TrainConfig, accelerator, dtype: torch.dtype, stop) -> TrainingSet | None:
    """Discover, bucket, encode what the cache lacks (split across ranks). None if stopped by a signal."""
    report: dict = {"skipped": {}, "upscaled": 0}
    samples = assign_buckets(config, discover(config, report), report)
    model_path = Path(config.pretrained_model_name_or_path)
    device, rank, processes = accelerator.device, accelerator.process_index, accelerator.num_processes

    latent_cache = cache.LatentCache(_cache_root(config, "vae"), cache.fingerprint(
        cache.CACHE_FORMAT, cache.weights_signature(model_path / "vae"), str(dtype)))
    # shares are cut from the full list, not from what is missing: ranks look at the cache at different moments
    unique = list({s.key: s for s in samples}.values())
    work = [s for s in cache.my_share(unique, rank, processes)
            if not latent_cache.path(s.bucket, s.key).is_file() and not latent_cache.unreadable_marker(s.key).exists()]
    log.info("latent cache %s: %d images, %d to encode here, buckets %s", latent_cache.folder, len(unique),
             len(work), ", ".join(f"{w}x{h}" for w, h in sorted({s.bucket for s in samples})))
    if work and not _encode_latents(config, work, latent_cache, device, dtype, stop):
        return None
    accelerator.wait_for_everyone()
    # machines that do not share a cache folder (each its own work dir) each encode what they still lack
    missing = [s for s in unique if not latent_cache.path(s.bucket, s.key).is_file()
               and not latent_cache.unreadable_marker(s.key).exists()]
    if missing and _machines() > 1:
        log.info("latent cache %s: %d images another machine encoded into its own cache: encoding them here",
                 latent_cache.folder, len(missing))
        if not _encode_latents(config, missing, latent_cache, device, dtype, stop):
            return None

    kept = []
    for sample in samples:
        if latent_cache.path(sample.bucket, sample.key).is_file():
            kept.append(sample)
        else:  # another rank's share that never arrived (it stopped or failed) counts apart from broken files
            reason = "unreadable" if latent_cache.unreadable_marker(sample.key).exists() else "not_encoded"
            _skip(report, reason, sample.path.name)
    if not kept:
        raise DataError(_zero_usable_message(config, samples, report))

    prompts: dict[str, int] = {"": EMPTY_PROMPT_ID}  # a dict: de-duplication in O(1) per caption
    for text in [s.caption for s in kept] + config.validation_prompts + [config.validation_negative_prompt]:
        prompts.setdefault(text, len(prompts))
    text_cache = cache.TextCache(_cache_root(config, "text"), cache.fingerprint(
        cache.CACHE_FORMAT, [cache.weights_signature(model_path / part) for part in TEXT_ENCODER_PARTS],
        config.tokenizer_max_length, config.t5_padding, str(dtype)))
    work_text = [text for text in cache.my_share(list(prompts), rank, processes) if not text_cache.path(text).is_file()]
    log.info("text cache %s: %d distinct prompts, %d to encode here", text_cache.folder, len(prompts), len(work_text))
    if work_text and not _encode_prompts(config, work_text, text_cache, device, dtype, stop):
        return None
    accelerator.wait_for_everyone()
    missing_text = [text for text in prompts if not text_cache.path(text).is_file()]
    if missing_text and _machines() > 1 and not _encode_prompts(config, missing_text, text_cache, device, dtype, stop):
        return None

    caption_ids = torch.tensor([prompts[s.caption] for s in kept], dtype=torch.long)
    order = torch.cat([torch.full((s.repeats + 1,), i, dtype=torch.long) for i, s in enumerate(kept)])
    texts = list(prompts)
    return TrainingSet(
        latent_files=[latent_cache.path(s.bucket, s.key) for s in kept],
        buckets=[s.bucket for s in kept],
        caption_ids=caption_ids,
        prompts=texts,
        embeddings=cache.LazyEmbeddings([text_cache.path(text) for text in texts]),
        order=order,
        report=_final_report(config, report, kept),
    )


def _final_report(config: TrainConfig, report: dict, kept: list[Sample]) -> dict:
    """Merge the entry script's preparation report (skips while unpacking) with ours."""
    merged = {"images": len(kept), "skipped": dict(report.get("skipped", {})), "upscaled": report.get("upscaled", 0)}
    examples = dict(report.get("examples", {}))
    for backend in config.image_backends:
        prep_file = backend.instance_data_dir / REPORT_NAME
        if prep_file.is_file():
            prep = json.loads(prep_file.read_text(encoding="utf-8"))
            for reason, count in prep.get("skipped", {}).items():
                merged["skipped"][reason] = merged["skipped"].get(reason, 0) + count
            for reason, names in prep.get("examples", {}).items():
                examples.setdefault(reason, names)
    merged["examples"] = examples
    counts: dict[str, int] = {}
    for sample in kept:
        name = f"{sample.bucket[0]}x{sample.bucket[1]}"
        counts[name] = counts.get(name, 0) + 1
    merged["buckets"] = counts
    if report.get("downsampled"):
        merged["downsampled"] = report["downsampled"]
    if merged["upscaled"]:
        log.warning("%d images are smaller than their bucket at %d px and were upscaled (set minimum_image_size to drop them instead)",
                    merged["upscaled"], config.resolution)
    return merged


def _zero_usable_message(config, samples, report) -> str:
    skipped = report.get("skipped", {})
    minimum = next((b.minimum_image_size for b in config.image_backends if b.minimum_image_size), None)
    minimum = minimum or config.minimum_image_size
    folders = ", ".join(str(b.instance_data_dir) for b in config.image_backends)
    if not samples and not skipped.get("too_small") and not skipped.get("unreadable"):
        names = ", ".join(report.get("examples", {}).get("no_caption", []))
        return f"no image in {folders} has a caption (e.g. {names})"
    if skipped.get("too_small"):
        total = skipped["too_small"] + len(samples)
        return (f"minimum_image_size={minimum} rejected {skipped['too_small']} of {total} images "
                f"(e.g. {', '.join(report['examples']['too_small'][:3])}); no usable image is left - lower or remove "
                "minimum_image_size (smaller images are upscaled to the training resolution)")
    return f"all {skipped.get('unreadable', 0)} images are unreadable (e.g. {', '.join(report.get('examples', {}).get('unreadable', [])[:3])})"


# ---------------------------------------------------------------- sampling


class BatchPlan:
    """Which samples each process sees at each optimizer step: a pure function of (seed, step).

    Every epoch the samples are shuffled, grouped by bucket, cut into batches (a bucket's
    last batch is filled up from the same bucket) and the batches shuffled; nothing depends
    on iteration history, so a resumed run sees exactly the batches an uninterrupted one would.
    """

    def __init__(self, order: torch.Tensor, batch_size: int, accumulation: int, processes: int, seed: int,
                 sample_buckets: list[tuple[int, int]] | None = None):
        self.order, self.batch_size, self.accumulation = order, batch_size, accumulation
        self.processes, self.seed = processes, seed
        self.sample_buckets = sample_buckets or [(0, 0)] * (int(order.max()) + 1 if len(order) else 0)
        sizes: dict[tuple[int, int], int] = {}
        for index in order.tolist():
            sizes[self.sample_buckets[index]] = sizes.get(self.sample_buckets[index], 0) + 1
        self.batches_per_epoch = sum(-(-count // batch_size) for count in sizes.values())
        self._epoch: tuple[int, list[list[int]]] | None = None

    def _batches(self, epoch: int) -> list[list[int]]:
        if self._epoch is None or self._epoch[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            shuffled = self.order[torch.randperm(len(self.order), generator=generator)].tolist()
            groups: dict[tuple[int, int], list[int]] = {}
            for index in shuffled:
                groups.setdefault(self.sample_buckets[index], []).append(index)
            batches = []
            for members in groups.values():
                for start in range(0, len(members), self.batch_size):
                    batch = members[start : start + self.batch_size]
                    batch += [members[k % len(members)] for k in range(self.batch_size - len(batch))]
                    batches.append(batch)
            mixed = torch.randperm(len(batches), generator=generator).tolist()
            self._epoch = (epoch, [batches[i] for i in mixed])
        return self._epoch[1]

    def indices(self, step: int, micro: int, rank: int) -> torch.Tensor:
        number = ((step - 1) * self.accumulation + micro) * self.processes + rank
        epoch, within = divmod(number, self.batches_per_epoch)
        return torch.tensor(self._batches(epoch)[within], dtype=torch.long)

    def steps_per_epoch(self) -> int:
        return max(1, -(-self.batches_per_epoch // (self.processes * self.accumulation)))


def step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """The noise/timestep RNG of one micro-batch on one process, independent of history."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 1_009 + micro * 31 + rank) % (2**63))
