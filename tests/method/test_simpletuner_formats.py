"""SimpleTuner's current config names: its example SD3 LoRA config (written here from the documented
keys, paths pointed at the tiny model) trains and checkpoints; aliases, WxH sizes, {model_family}."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from conftest import textfile_dataset
from sd_trainer.config import ConfigError, load_config


def simpletuner_example(folder: Path, model: Path, images: Path, **overrides) -> Path:
    """examples/sd3.peft-lora/config.json's keys and values, with local paths and tiny-model sizes."""
    config = {
        "model_type": "lora", "model_family": "sd3", "lora_type": "standard", "lora_rank": 4, "lora_alpha": 4,
        "pretrained_model_name_or_path": str(model), "output_dir": str(folder / "output"),
        "checkpoint_step_interval": 2, "checkpoints_total_limit": 5,
        "validation_steps": 100, "validation_resolution": "64x64",
        "validation_prompt": "a circle number 0", "validation_negative_prompt": "blurry",
        "validation_guidance": 5.0, "validation_guidance_rescale": 0.0, "validation_guidance_skip_layers": [7, 8, 9],
        "validation_num_inference_steps": 2, "validation_seed": 42, "validation_disable_unconditional": True,
        "validation_prompt_library": False, "gradient_checkpointing": True, "grad_clip_method": "value",
        "max_grad_norm": 0.1, "flow_schedule_shift": 1.0, "optimizer": "adamw_bf16", "lr_scheduler": "polynomial",
        "learning_rate": 1e-4, "lr_warmup_steps": 1, "max_train_steps": 4, "num_train_epochs": 0,
        "train_batch_size": 1, "vae_batch_size": 1, "mixed_precision": "bf16", "base_model_precision": "no_change",
        "quantize_via": "cpu", "seed": 42, "resolution": 64, "resolution_type": "pixel_area",
        "data_backend_config": str(folder / "multidatabackend.json"), "report_to": "wandb", "push_to_hub": False,
        "push_checkpoints_to_hub": False, "hub_model_id": "simpletuner-sd3-peft-lora", "use_ema": False,
        "tracker_project_name": "lora-training", "tracker_run_name": "example-training-run",
        **overrides,
    }
    backends = [
        {"id": "pseudo-camera-10k-sd3", "type": "local", "crop": True, "crop_aspect": "square", "crop_style": "center",
         "resolution": 64, "minimum_image_size": 32, "maximum_image_size": 96, "target_downsample_size": 64,
         "resolution_type": "pixel_area", "cache_dir_vae": str(folder / "cache/vae/{model_family}/pseudo-camera-10k"),
         "instance_data_dir": str(images), "disabled": False, "skip_file_discovery": "", "caption_strategy": "textfile",
         "metadata_backend": "discovery", "repeats": 0, "is_regularisation_data": True, "probability": 1.0,
         "prepend_instance_prompt": False, "vae_cache_clear_each_epoch": False},
        {"id": "text-embeds", "type": "local", "dataset_type": "text_embeds", "default": True,
         "cache_dir": str(folder / "cache/text/{model_family}"), "disabled": False, "write_batch_size": 128},
    ]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "multidatabackend.json").write_text(json.dumps(backends))
    (folder / "config.json").write_text(json.dumps(config))
    return folder / "config.json"


def test_example_config_is_read_with_current_names(tmp_path, caplog):
    images = textfile_dataset(tmp_path / "images", count=1)
    with caplog.at_level(logging.WARNING, logger="sd_trainer"):
        config = load_config(simpletuner_example(tmp_path, Path("/models/sd3"), images))
    assert config.checkpointing_steps == 2 and config.validation_resolution == (64, 64)
    assert config.gradient_checkpointing is True and config.grad_clip_method == "value"
    assert config.tokenizer_max_length == 154  # SimpleTuner's cap for SD3's T5
    backend = config.image_backends[0]
    assert backend.crop and backend.crop_aspect == "square" and backend.resolution_type == "pixel_area"
    assert backend.maximum_image_size == 96 and backend.target_downsample_size == 64
    assert backend.cache_dir_vae == tmp_path / "cache/vae/sd3/pseudo-camera-10k"  # {model_family} expanded
    assert config.text_cache_dir == tmp_path / "cache/text/sd3"
    for ignored in ("validation_guidance_skip_layers", "report_to", "hub_model_id",
                    "pseudo-camera-10k-sd3.probability", "pseudo-camera-10k-sd3.metadata_backend"):
        assert sum(ignored in record.getMessage() for record in caplog.records) == 1, ignored


def test_example_config_trains_and_checkpoints(tmp_path, tiny_model):
    from test_training import run_trainer

    images = textfile_dataset(tmp_path / "images", count=2, size=128)
    code, events = run_trainer(simpletuner_example(tmp_path, tiny_model, images))
    assert code == 0, events[-1]
    assert [e["step"] for e in events if e["event"] == "checkpoint"] == [2, 4]
    assert (tmp_path / "output" / "checkpoint-4").is_dir() and (tmp_path / "output" / "pytorch_lora_weights.safetensors").is_file()
    dataset = next(e for e in events if e["event"] == "dataset")
    assert dataset["downsampled"] == 2 and dataset["buckets"] == {"64x64": 2}  # 128 px > maximum_image_size 96
    assert list((tmp_path / "cache" / "vae" / "sd3" / "pseudo-camera-10k").rglob("*.safetensors"))


def test_unknown_keys_are_named_once_each(tmp_path, caplog):
    images = textfile_dataset(tmp_path / "images", count=1)
    path = simpletuner_example(tmp_path, Path("/m"), images, some_future_flag=1, another_new_knob="x")
    backends = json.loads((tmp_path / "multidatabackend.json").read_text())
    backends[0]["new_backend_option"] = 3
    (tmp_path / "multidatabackend.json").write_text(json.dumps(backends))
    with caplog.at_level(logging.WARNING, logger="sd_trainer"):
        load_config(path)
    messages = [record.getMessage() for record in caplog.records]
    for key in ("some_future_flag", "another_new_knob", "new_backend_option"):
        assert sum(key in message and "unknown" in message for message in messages) == 1, key


@pytest.mark.parametrize("legacy, current, field, value", [
    ("checkpointing_steps", "checkpoint_step_interval", "checkpointing_steps", 7),
    ("validation_steps", "validation_step_interval", "validation_steps", 9),
    ("disable_validation", "validation_disable", "disable_validation", True),
])
def test_legacy_and_current_names_mean_the_same(tmp_path, legacy, current, field, value):
    images = textfile_dataset(tmp_path / "images", count=1)
    old = load_config(simpletuner_example(tmp_path / "old", Path("/m"), images, **{legacy: value}))
    new = load_config(simpletuner_example(tmp_path / "new", Path("/m"), images, **{current: value}))
    assert getattr(old, field) == getattr(new, field) == value


def test_current_keys_change_what_is_trained(tmp_path):
    images = textfile_dataset(tmp_path / "images", count=1)
    config = load_config(simpletuner_example(
        tmp_path, Path("/m"), images, peft_lora_target_modules=["to_q", "to_k", "ff.net.2"],
        flow_use_uniform_schedule=True, t5_padding="zero", validation_resolution="1024x768,512x512"))
    assert config.lora_target_modules == ("to_q", "to_k", "ff.net.2")
    assert config.weighting_scheme == "none" and config.t5_padding == "zero"
    assert config.validation_resolution == (1024, 768)


@pytest.mark.parametrize("options, message", [
    ({"validation_resolution": "1024x"}, "validation_resolution"),
    ({"validation_resolution": "1000x1000"}, "multiple of 16"),
    ({"grad_clip_method": "agc"}, "grad_clip_method"),
    ({"t5_padding": "left"}, "t5_padding"),
])
def test_bad_current_values_name_the_key(tmp_path, options, message):
    images = textfile_dataset(tmp_path / "images", count=1)
    with pytest.raises(ConfigError, match=message):
        load_config(simpletuner_example(tmp_path, Path("/m"), images, **options))


def test_area_resolution_is_megapixels(tmp_path):
    images = textfile_dataset(tmp_path / "images", count=1)
    path = simpletuner_example(tmp_path, Path("/m"), images, resolution=1.0, resolution_type="area")
    backends = json.loads((tmp_path / "multidatabackend.json").read_text())
    backends[0].update(resolution=1.0, resolution_type="area")
    (tmp_path / "multidatabackend.json").write_text(json.dumps(backends))
    config = load_config(path)
    assert config.resolution == 1024 and config.image_backends[0].resolution_type == "pixel_area"


def test_t5_padding_zero_zeroes_only_the_t5_padding(tiny_model):
    import torch
    from sd_trainer import model

    pipeline = model.load_text_pipeline(tiny_model, torch.float32, torch.device("cpu"))
    plain, _ = model.encode_prompts(pipeline, ["a red circle"], 32, torch.device("cpu"), "unmodified")
    zeroed, pooled = model.encode_prompts(pipeline, ["a red circle"], 32, torch.device("cpu"), "zero")
    tokens = int(pipeline.tokenizer_3(["a red circle"], max_length=32, truncation=True,
                                      padding="max_length", return_tensors="pt").attention_mask.sum())
    t5_start = plain.shape[1] - 32
    assert torch.equal(zeroed[:, :t5_start + tokens], plain[:, :t5_start + tokens])
    assert plain[:, t5_start + tokens:].abs().sum() > 0 and zeroed[:, t5_start + tokens:].abs().sum() == 0
