"""Aspect-ratio buckets: mixed shapes keep their aspect, batches never mix buckets."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from conftest import write_trainer_config
from sd_trainer import buckets, data
from sd_trainer.config import ImageBackend, load_config


def backend(**options) -> ImageBackend:
    return ImageBackend(id="b", instance_data_dir=Path("."), **options)


@pytest.mark.parametrize("size", [(1024, 1536), (1536, 1024), (1024, 1024), (3000, 1000), (900, 1600)])
def test_pixel_area_buckets_keep_aspect_and_area(size):
    width, height = buckets.bucket_for(*size, backend(resolution_type="pixel_area"), 1024, 64)
    assert width % 64 == 0 and height % 64 == 0
    assert abs(width * height / 1024**2 - 1) < 0.15
    assert abs(width / height - size[0] / size[1]) / (size[0] / size[1]) < 0.1


def test_pixel_buckets_keep_the_short_side():
    assert buckets.bucket_for(1000, 1500, backend(resolution_type="pixel"), 512, 64) == (512, 768)
    assert buckets.bucket_for(1500, 1000, backend(resolution_type="pixel"), 512, 64) == (768, 512)


def test_square_crop_aspect_gives_one_square_bucket():
    assert buckets.bucket_for(1000, 1500, backend(crop=True, crop_aspect="square"), 512, 64) == (512, 512)


def test_extreme_aspects_are_clamped():
    width, height = buckets.bucket_for(10000, 100, backend(resolution_type="pixel_area"), 512, 64)
    assert width / height <= buckets.MAX_ASPECT + 0.5


def _picture(path: Path, size: tuple[int, int], shade: int = 0) -> Path:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, (30, 60 + shade, 200))
    ImageDraw.Draw(image).rectangle((0, 0, size[0] - 1, size[1] // 4), fill=(250, 250, 0))  # a "head" at the top
    image.save(path)
    return path


@pytest.mark.parametrize("style", ["center", "random", "corner"])
def test_crop_styles_cut_only_the_spare_side(tmp_path, style):
    path = _picture(tmp_path / "p.png", (96, 64))
    pixels, status = buckets.load_pixels(path, (64, 64), backend(crop=True, crop_style=style), key="k")
    assert pixels.shape == (3, 64, 64) and status == "ok"
    again, _ = buckets.load_pixels(path, (64, 64), backend(crop=True, crop_style=style), key="k")
    assert torch.equal(pixels, again)  # random crops are fixed per image, so cached latents stay valid


def test_without_crop_the_whole_portrait_is_kept(tmp_path):
    """The yellow band at the top (the 'head') survives: the image is resized, not cropped."""
    path = _picture(tmp_path / "portrait.png", (64, 128))
    pixels, _ = buckets.load_pixels(path, (48, 96), backend(), key="k")
    assert pixels.shape == (3, 96, 48)
    top_row = (pixels[:, 1, :] + 1) * 127.5
    assert top_row[0].mean() > 200 and top_row[2].mean() < 60  # yellow: red high, blue low


def test_batch_plan_never_mixes_buckets_and_covers_every_sample():
    sample_buckets = [(64, 64)] * 5 + [(48, 80)] * 3 + [(80, 48)] * 1
    order = torch.arange(len(sample_buckets))
    plan = data.BatchPlan(order, 2, 1, 1, seed=3, sample_buckets=sample_buckets)
    seen = set()
    for step in range(1, plan.steps_per_epoch() * 3 + 1):
        batch = plan.indices(step, 0, 0).tolist()
        assert len(batch) == 2 and len({sample_buckets[i] for i in batch}) == 1
        if step <= plan.steps_per_epoch():
            seen.update(batch)
    assert seen == set(range(len(sample_buckets)))
    assert plan.indices(4, 0, 0).tolist() == data.BatchPlan(order, 2, 1, 1, 3, sample_buckets).indices(4, 0, 0).tolist()


def test_mixed_aspect_dataset_trains_in_its_buckets(tmp_path, tiny_model):
    from accelerate.state import AcceleratorState
    from sd_trainer.loop import StopFlag, train

    images = tmp_path / "images"
    images.mkdir()
    shapes = {"portrait": (64, 128), "landscape": (128, 64), "square": (96, 96)}
    for name, size in shapes.items():
        for copy in range(2):
            _picture(images / f"{name}{copy}.png", size, shade=40 * copy)
            (images / f"{name}{copy}.txt").write_text(f"a {name} picture {copy}")
    config_path = write_trainer_config(tmp_path, tiny_model, images, max_train_steps=4, train_batch_size=2,
                                       resolution_type="pixel_area", validation_steps=0, disable_validation=True)
    config = load_config(config_path)
    shapes_seen = []
    original = data.TrainingSet.latents

    def recording(self, indices, flip=None):
        latents = original(self, indices, flip)
        shapes_seen.append(tuple(latents.shape[-2:]))
        return latents

    AcceleratorState._reset_state(True)
    output = io.StringIO()
    data.TrainingSet.latents = recording
    try:
        with contextlib.redirect_stdout(output):
            assert train(config, StopFlag()) == 0
    finally:
        data.TrainingSet.latents = original
    events = [json.loads(line) for line in output.getvalue().splitlines() if line.startswith("{")]
    dataset = next(e for e in events if e["event"] == "dataset")
    assert dataset["images"] == 6 and len(dataset["buckets"]) == 3
    widths_heights = [tuple(int(v) for v in name.split("x")) for name in dataset["buckets"]]
    assert any(w < h for w, h in widths_heights) and any(w > h for w, h in widths_heights)
    assert all(w * h <= 1.3 * 64 * 64 for w, h in widths_heights)
    assert len(set(shapes_seen)) == 3  # 4 steps of one-bucket batches visit all three buckets (stacking a mix fails)
    latent_files = list((tmp_path / "cache" / "vae").rglob("*.safetensors"))
    assert len(latent_files) == 6 and len({f.parent.name for f in latent_files}) == 3  # one folder per bucket
