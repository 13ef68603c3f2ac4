"""SimpleTuner's config files (`config.json`, `multidatabackend.json`) read into one TrainConfig.

Keys may be written with or without a leading `--`; a value of `false` drops the key
(as SimpleTuner drops the flag). Keys that would change *what* is trained in a way
this trainer cannot do are rejected (`ConfigError`); known harmless keys and
unknown keys are logged and ignored.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

log = logging.getLogger("sd_trainer")


class ConfigError(Exception):
    """A config problem; the message is one line and names the key and the file."""


LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
MIXED_PRECISION = ("no", "bf16", "fp16")
LORA_TARGETS = {
    "attention": ("to_q", "to_k", "to_v", "to_out.0"),
    "attention+context": ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"),
}
CAPTION_STRATEGIES = ("textfile", "filename", "instanceprompt")

# Keys this trainer accepts but has nothing to do with (trackers, hub, SimpleTuner internals).
IGNORED_KEYS = {
    "report_to", "tracker_project_name", "tracker_run_name", "push_to_hub", "hub_model_id",
    "aspect_bucket_rounding", "disable_benchmark", "vae_cache_scan_behaviour", "skip_file_discovery",
    "metadata_update_interval", "allow_tf32", "data_backend_sampling", "attention_mechanism",
    "max_workers", "read_batch_size", "write_batch_size", "torch_num_threads", "image_processing_batch_size",
    "aws_max_pool_connections", "enable_xformers_memory_efficient_attention", "delete_problematic_images",
    "delete_unwanted_images", "validation_torch_compile", "compress_disk_cache", "num_validation_images",
    "override_dataset_config", "validation_image_dir", "logging_dir", "webhook_config", "user_prompt_library",
    "use_ema", "ema_decay", "noise_offset", "disable_tf32", "validation_num_video_frames", "model_card_note",
    "snr_gamma", "use_soft_min_snr", "lr_end", "crop", "crop_style", "crop_aspect", "text_encoder_limit",
    "set_grads_to_none", "max_train_samples", "train_id",
}

# Keys whose unsupported values must stop the run: key -> (accepted values, why)
CRITICAL_VALUES = {
    "model_type": ({"lora"}, "this trainer only trains LoRA adapters"),
    "model_family": ({"sd3"}, "this trainer only supports Stable Diffusion 3 / 3.5"),
    "lora_type": ({"standard"}, "only peft LoRA is supported (no LyCORIS)"),
    "base_model_precision": ({"no_change"}, "base-model quantisation is not supported"),
    "resolution_type": ({"pixel", "pixel_area"}, "resolution must be given in pixels"),
}
CRITICAL_FLAGS = {
    "train_text_encoder": "training the text encoders is not supported",
    "controlnet": "ControlNet training is not supported",
    "use_dora": "DoRA is not supported",
}


@dataclass
class ImageBackend:
    id: str
    instance_data_dir: Path
    caption_strategy: str = "textfile"
    instance_prompt: str | None = None
    resolution: int | None = None
    minimum_image_size: int | None = None
    repeats: int = 0
    cache_dir_vae: Path | None = None


@dataclass
class TrainConfig:
    pretrained_model_name_or_path: Path = Path()
    output_dir: Path = Path("output")
    resolution: int = 1024
    minimum_image_size: int | None = None
    train_batch_size: int = 1
    max_train_steps: int = 0
    num_train_epochs: int = 0
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    lr_num_cycles: int = 1
    lr_power: float = 1.0
    mixed_precision: str | None = None  # None: whatever accelerate launch was told
    seed: int = 42
    lora_rank: int = 16
    lora_alpha: float | None = None  # None: equal to the rank
    lora_dropout: float = 0.0
    lora_target: str = "attention"
    max_grad_norm: float = 1.0
    optimizer: str = "adamw"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    weighting_scheme: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    flow_schedule_shift: float | None = None  # None: the model's scheduler `shift`
    caption_dropout_probability: float = 0.0
    tokenizer_max_length: int = 256
    gradient_checkpointing: bool = False
    vae_batch_size: int = 4
    checkpointing_steps: int = 0
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    validation_steps: int = 0
    validation_prompt: str | None = None
    validation_negative_prompt: str = ""
    validation_num_inference_steps: int = 20
    validation_guidance: float = 5.0
    validation_resolution: int | None = None
    validation_seed: int | None = None
    disable_validation: bool = False
    tracker_run_name: str | None = None
    data_backend_config: Path | None = None
    image_backends: list[ImageBackend] = field(default_factory=list)
    text_cache_dir: Path | None = None
    source: Path | None = None  # the config.json this came from


_FIELD_TYPES = {f.name: f.type for f in fields(TrainConfig)}


def normalise_keys(raw: dict, where: Path) -> dict:
    """Strip leading dashes, drop `false` values (SimpleTuner drops those flags)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a JSON object of options")
    out = {}
    for key, value in raw.items():
        name = str(key).lstrip("-").replace("-", "_")
        if value is False or (isinstance(value, str) and value.strip().lower() == "false"):
            continue
        if isinstance(value, str) and value.strip().lower() == "true":
            value = True
        out[name] = value
    return out


def _convert(name: str, value, kind: str, where: Path):
    try:
        if "bool" in kind:
            return bool(value)
        if kind.startswith("int"):
            number = float(value)
            if not math.isfinite(number) or number != int(number):
                raise ValueError
            return int(number)
        if kind.startswith("float"):
            number = float(value)
            if not math.isfinite(number):
                raise ValueError
            return number
        if kind.startswith("Path"):
            return Path(str(value))
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {name}={value!r} is not a valid {kind.split()[0].split('|')[0]}") from None


def _check_critical(options: dict, where: Path) -> None:
    for key, (accepted, why) in CRITICAL_VALUES.items():
        if key in options and str(options[key]).lower() not in accepted:
            raise ConfigError(f"{where}: {key}={options[key]!r} is not supported ({why}; use {'/'.join(sorted(accepted))})")
    for key, why in CRITICAL_FLAGS.items():
        if options.get(key):
            raise ConfigError(f"{where}: {key} is set but {why}")


def load_config(path: Path) -> TrainConfig:
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: invalid JSON ({error})") from None
    options = normalise_keys(raw, path)
    _check_critical(options, path)

    config = TrainConfig(source=path)
    for name, value in options.items():
        if name in ("model_type", "model_family", "lora_type", "base_model_precision", "resolution_type"):
            continue
        if name in _FIELD_TYPES and name not in ("image_backends", "text_cache_dir", "source"):
            setattr(config, name, _convert(name, value, str(_FIELD_TYPES[name]), path))
        elif name == "validation_guidance_scale":
            config.validation_guidance = _convert(name, value, "float", path)
        elif name in IGNORED_KEYS:
            if name == "report_to" and str(value).lower() in ("none", ""):
                continue
            log.info("config: %s=%r has no effect in this trainer; ignored", name, value)
        elif name not in CRITICAL_FLAGS:
            log.warning("config: unknown key %s=%r ignored", name, value)
    if config.tracker_run_name is None and options.get("train_id"):
        config.tracker_run_name = str(options["train_id"])
    validate(config, path)
    if config.data_backend_config is None:
        raise ConfigError(f"{path}: data_backend_config is missing (path to multidatabackend.json)")
    _load_backends(config, _relative_to_cwd(config.data_backend_config))
    return config


def _relative_to_cwd(path: Path) -> Path:
    return path if path.is_absolute() else Path.cwd() / path


def validate(config: TrainConfig, where: Path) -> None:
    def need(condition: bool, message: str) -> None:
        if not condition:
            raise ConfigError(f"{where}: {message}")

    need(str(config.pretrained_model_name_or_path) not in ("", "."), "pretrained_model_name_or_path is missing")
    need(config.max_train_steps > 0 or config.num_train_epochs > 0, "max_train_steps (or num_train_epochs) must be > 0")
    need(config.resolution >= 64 and config.resolution % 16 == 0, f"resolution={config.resolution} must be >= 64 and a multiple of 16")
    need(config.train_batch_size >= 1, "train_batch_size must be >= 1")
    need(config.gradient_accumulation_steps >= 1, "gradient_accumulation_steps must be >= 1")
    need(config.learning_rate > 0, "learning_rate must be > 0")
    need(config.lr_warmup_steps >= 0, "lr_warmup_steps must be >= 0")
    need(config.lr_scheduler in LR_SCHEDULERS, f"lr_scheduler={config.lr_scheduler!r} is not one of {', '.join(LR_SCHEDULERS)}")
    need(config.lora_rank >= 1, "lora_rank must be >= 1")
    need(config.lora_target in LORA_TARGETS, f"lora_target={config.lora_target!r} is not one of {', '.join(LORA_TARGETS)}")
    need(config.optimizer.startswith("adamw") and config.optimizer != "adamw8bit", f"optimizer={config.optimizer!r} is not supported (adamw, adamw_bf16)")
    need(config.mixed_precision in (None, *MIXED_PRECISION), f"mixed_precision={config.mixed_precision!r} is not one of {', '.join(MIXED_PRECISION)}")
    need(config.weighting_scheme in ("logit_normal", "none"), f"weighting_scheme={config.weighting_scheme!r} is not supported (logit_normal, none)")
    need(0.0 <= config.caption_dropout_probability < 1.0, "caption_dropout_probability must be in [0, 1)")
    need(1 <= config.tokenizer_max_length <= 512, "tokenizer_max_length must be in 1..512")
    need(config.checkpointing_steps >= 0 and config.validation_steps >= 0, "checkpointing_steps/validation_steps must be >= 0")
    if config.resume_from_checkpoint in ("", "none", "None"):
        config.resume_from_checkpoint = None


def _load_backends(config: TrainConfig, path: Path) -> None:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"data backend config {path} does not exist") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: invalid JSON ({error})") from None
    if not isinstance(raw, list):
        raise ConfigError(f"{path}: expected a JSON list of data backends")
    for number, entry in enumerate(raw):
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: entry {number} is not an object")
        entry = normalise_keys(entry, path)
        name = entry.get("id", f"#{number}")
        if entry.get("disabled") or entry.get("disable"):
            continue
        dataset_type = entry.get("dataset_type", "image")
        if dataset_type == "text_embeds":
            if entry.get("type", "local") != "local":
                raise ConfigError(f"{path}: backend {name}: type={entry['type']!r} is not supported (local only)")
            if entry.get("cache_dir"):
                config.text_cache_dir = _relative_to_cwd(Path(entry["cache_dir"]))
            continue
        if dataset_type != "image":
            raise ConfigError(f"{path}: backend {name}: dataset_type={dataset_type!r} is not supported (image, text_embeds)")
        if entry.get("type", "local") != "local":
            raise ConfigError(f"{path}: backend {name}: type={entry.get('type')!r} is not supported (local only)")
        strategy = entry.get("caption_strategy", "textfile")
        if strategy not in CAPTION_STRATEGIES:
            raise ConfigError(f"{path}: backend {name}: caption_strategy={strategy!r} is not supported ({', '.join(CAPTION_STRATEGIES)})")
        if str(entry.get("resolution_type", "pixel")) not in ("pixel", "pixel_area"):
            raise ConfigError(f"{path}: backend {name}: resolution_type={entry['resolution_type']!r} is not supported (pixel)")
        if "instance_data_dir" not in entry:
            raise ConfigError(f"{path}: backend {name}: instance_data_dir is missing")
        backend = ImageBackend(
            id=str(name),
            instance_data_dir=_relative_to_cwd(Path(entry["instance_data_dir"])),
            caption_strategy=strategy,
            instance_prompt=entry.get("instance_prompt"),
            resolution=_convert("resolution", entry["resolution"], "int", path) if "resolution" in entry else None,
            minimum_image_size=_convert("minimum_image_size", entry["minimum_image_size"], "int", path)
            if "minimum_image_size" in entry else None,
            repeats=_convert("repeats", entry.get("repeats", 0), "int", path),
            cache_dir_vae=_relative_to_cwd(Path(entry["cache_dir_vae"])) if entry.get("cache_dir_vae") else None,
        )
        if backend.resolution and backend.resolution != config.resolution:
            log.info("backend %s trains at %d px (config resolution %d)", backend.id, backend.resolution, config.resolution)
        config.image_backends.append(backend)
    if not config.image_backends:
        raise ConfigError(f"{path}: no enabled image backend")
    resolutions = {b.resolution or config.resolution for b in config.image_backends}
    if len(resolutions) > 1:
        raise ConfigError(f"{path}: image backends use different resolutions {sorted(resolutions)}; use one")
    config.resolution = resolutions.pop()
