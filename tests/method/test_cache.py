"""The lazy cache: one file per image and per distinct caption, shared across runs, split across ranks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import textfile_dataset, write_trainer_config
from sd_trainer import data, model
from sd_trainer.config import load_config


@dataclass
class FakeAccelerator:
    """The parts of accelerate's Accelerator that build_training_set uses, for one rank of several."""

    process_index: int = 0
    num_processes: int = 1
    device: torch.device = torch.device("cpu")

    def wait_for_everyone(self) -> None:
        pass


def never(*_args, **_kwargs):
    raise AssertionError("an encoder was loaded although everything was cached")


def dataset_with_shared_captions(folder: Path) -> Path:
    images = textfile_dataset(folder, count=4)
    (images / "img3.txt").write_text("a circle number 0")  # same caption as img0
    return images


def build(config_path: Path, accelerator=None):
    return data.build_training_set(load_config(config_path), accelerator or FakeAccelerator(), torch.float32, lambda: False)


def test_one_file_per_image_and_per_distinct_caption(tmp_path, tiny_model):
    images = dataset_with_shared_captions(tmp_path / "images")
    config = write_trainer_config(tmp_path / "run", tiny_model, images, validation_prompt="a validation prompt")
    training_set = build(config)
    assert len(list((tmp_path / "run" / "cache" / "vae").rglob("*.safetensors"))) == 4
    # "", 3 distinct captions, the validation prompt
    assert len(list((tmp_path / "run" / "cache" / "text").rglob("*.safetensors"))) == 5
    assert training_set.prompts[0] == "" and len(training_set.prompts) == 5
    assert training_set.caption_ids[0] == training_set.caption_ids[3]
    # nothing per sample is held in memory but ids: latents and embeddings are read per batch
    held = sum(value.numel() for value in vars(training_set).values() if isinstance(value, torch.Tensor))
    assert held == len(training_set.order) + len(training_set.caption_ids)
    latents = training_set.latents(torch.tensor([0, 1]))
    embeds, pooled = training_set.prompt_embeddings(torch.tensor([1, 2]))
    assert latents.shape == (2, 16, 8, 8) and embeds.shape[0] == 2 and pooled.shape[0] == 2


def test_a_second_run_with_the_same_cache_folder_encodes_nothing(tmp_path, tiny_model, monkeypatch):
    images = dataset_with_shared_captions(tmp_path / "images")
    shared = tmp_path / "shared-cache"

    def run_config(name: str) -> Path:
        path = write_trainer_config(tmp_path / name, tiny_model, images, validation_prompt="a validation prompt")
        text = path.read_text().replace(str(tmp_path / name / "cache"), str(shared))
        path.write_text(text)
        backends = path.parent / "multidatabackend.json"
        backends.write_text(backends.read_text().replace(str(tmp_path / name / "cache"), str(shared)))
        return path

    first = build(run_config("first"))
    monkeypatch.setattr(model, "load_vae", never)
    monkeypatch.setattr(model, "load_text_pipeline", never)
    second = build(run_config("second"))
    assert second.latent_files == first.latent_files and second.prompts == first.prompts
    assert torch.equal(second.latents(torch.tensor([2])), first.latents(torch.tensor([2])))


def test_encoding_is_split_across_ranks(tmp_path, tiny_model):
    images = textfile_dataset(tmp_path / "images", count=4)
    config = write_trainer_config(tmp_path / "run", tiny_model, images)
    partial = build(config, FakeAccelerator(process_index=1, num_processes=2))
    latent_files = list((tmp_path / "run" / "cache" / "vae").rglob("*.safetensors"))
    assert len(latent_files) == 2  # its half of the 4 images
    assert partial.report["skipped"].get("not_encoded") == 2  # rank 0 never ran: its share is missing
    complete = build(config, FakeAccelerator(process_index=0, num_processes=2))
    assert len(list((tmp_path / "run" / "cache" / "vae").rglob("*.safetensors"))) == 4
    assert complete.report["images"] == 4


def test_a_machine_whose_cache_folder_is_its_own_encodes_what_the_others_did_elsewhere(tmp_path, tiny_model,
                                                                                       monkeypatch):
    # two machines, each with its own work dir (envmgr's Slurm ranks): rank 1 cannot see rank 0's share
    monkeypatch.setenv("TRAINING_NUM_MACHINES", "2")
    images = textfile_dataset(tmp_path / "images", count=4)
    config = write_trainer_config(tmp_path / "run", tiny_model, images)
    alone = build(config, FakeAccelerator(process_index=1, num_processes=2))
    assert len(list((tmp_path / "run" / "cache" / "vae").rglob("*.safetensors"))) == 4
    assert alone.report["images"] == 4 and not alone.report["skipped"].get("not_encoded")


def test_ranks_wait_for_each_other_with_the_configured_timeout(tmp_path, monkeypatch):
    import accelerate
    from sd_trainer.loop import StopFlag, train

    seen = {}

    class Stop(Exception):
        pass

    def capturing_accelerator(**kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(accelerate, "Accelerator", capturing_accelerator)
    images = textfile_dataset(tmp_path / "images", count=1)
    config = load_config(write_trainer_config(tmp_path, tmp_path / "m", images, process_group_timeout=5400))
    with pytest.raises(Stop):
        train(config, StopFlag())
    (handler,) = seen["kwargs_handlers"]
    assert handler.timeout.total_seconds() == 5400
