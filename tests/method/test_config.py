"""SimpleTuner config keys: dash/no-dash, `false` drops a key, critical values rejected."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sd_trainer.config import ConfigError, load_config


def write(tmp_path: Path, options: dict, backends: list | None = None) -> Path:
    backends = backends if backends is not None else [
        {"id": "a", "type": "local", "instance_data_dir": str(tmp_path / "images"), "caption_strategy": "textfile"},
        {"id": "t", "dataset_type": "text_embeds", "default": True, "cache_dir": str(tmp_path / "cache")},
    ]
    (tmp_path / "backends.json").write_text(json.dumps(backends))
    base = {"pretrained_model_name_or_path": "/models/x", "max_train_steps": 10,
            "data_backend_config": str(tmp_path / "backends.json")}
    (tmp_path / "config.json").write_text(json.dumps({**base, **options}))
    return tmp_path / "config.json"


def test_keys_with_and_without_dashes_and_string_numbers(tmp_path):
    config = load_config(write(tmp_path, {"--resolution": "512", "lora_rank": 8, "--learning_rate": "2e-4",
                                          "--gradient_checkpointing": "true"}))
    assert (config.resolution, config.lora_rank, config.learning_rate) == (512, 8, 2e-4)
    assert config.gradient_checkpointing is True
    assert config.text_cache_dir == tmp_path / "cache"


def test_false_drops_the_key(tmp_path):
    config = load_config(write(tmp_path, {"--resume_from_checkpoint": False, "--validation_prompt": "false"}))
    assert config.resume_from_checkpoint is None and config.validation_prompt is None


@pytest.mark.parametrize("options, message", [
    ({"model_family": "sdxl"}, "model_family"),
    ({"--model_type": "full"}, "model_type"),
    ({"lora_type": "lycoris"}, "lora_type"),
    ({"train_text_encoder": True}, "train_text_encoder"),
    ({"mixed_precision": "fp8"}, "mixed_precision"),
    ({"lr_scheduler": "sgdr"}, "lr_scheduler"),
    ({"max_train_steps": "ten"}, "max_train_steps"),
    ({"resolution": 100}, "resolution"),
    ({"optimizer": "prodigy"}, "optimizer"),
])
def test_critical_unsupported_values_are_rejected(tmp_path, options, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, options))


@pytest.mark.parametrize("backend, message", [
    ({"id": "a", "type": "aws", "instance_data_dir": "x"}, "type='aws'"),
    ({"id": "a", "type": "local", "instance_data_dir": "x", "caption_strategy": "parquet"}, "caption_strategy"),
    ({"id": "a", "type": "local", "dataset_type": "conditioning", "instance_data_dir": "x"}, "dataset_type"),
    ({"id": "a", "type": "local"}, "instance_data_dir"),
])
def test_unsupported_data_backends_are_rejected(tmp_path, backend, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, {}, [backend]))


def test_unknown_harmless_keys_are_logged_and_ignored(tmp_path, caplog):
    config = load_config(write(tmp_path, {"--report_to": "wandb", "--some_future_flag": 3}))
    assert config.max_train_steps == 10
    assert "some_future_flag" in caplog.text


def test_missing_config_and_backend_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.json")
    path = write(tmp_path, {})
    (tmp_path / "backends.json").unlink()
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(path)
