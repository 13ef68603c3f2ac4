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
_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
_CONTEXT = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
_FEED_FORWARD = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
LORA_TARGETS = {  # --lora_target presets
    "attention": _ATTENTION,
    "attention+context": _ATTENTION + _CONTEXT,
    "attention+context+ff": _ATTENTION + _CONTEXT + _FEED_FORWARD,
}
LORA_TARGETS["all"] = LORA_TARGETS["attention+context+ff"]
CAPTION_STRATEGIES = ("textfile", "filename", "instanceprompt")

# Keys this trainer accepts but has nothing to do with (trackers, hub, SimpleTuner internals).
IGNORED_KEYS = {
    "report_to", "tracker_project_name", "tracker_run_name", "push_to_hub", "push_checkpoints_to_hub", "hub_model_id",
    "aspect_bucket_rounding", "disable_benchmark", "vae_cache_scan_behaviour", "skip_file_discovery",
    "metadata_update_interval", "allow_tf32", "data_backend_sampling", "attention_mechanism",
    "max_workers", "read_batch_size", "write_batch_size", "torch_num_threads", "image_processing_batch_size",
    "aws_max_pool_connections", "enable_xformers_memory_efficient_attention", "delete_problematic_images",
    "delete_unwanted_images", "validation_torch_compile", "compress_disk_cache", "num_validation_images",
    "override_dataset_config", "validation_image_dir", "logging_dir", "webhook_config",
    "use_ema", "ema_decay", "dataloader_prefetch", "noise_offset", "disable_tf32", "validation_num_video_frames", "model_card_note",
    "snr_gamma", "use_soft_min_snr", "lr_end", "text_encoder_limit",
    "set_grads_to_none", "max_train_samples", "train_id", "quantize_via", "validation_guidance_rescale",
    "validation_guidance_skip_layers", "validation_guidance_skip_layers_start", "validation_guidance_skip_layers_stop",
    "validation_guidance_skip_scale", "validation_disable_unconditional", "validation_prompt_library",
    "validation_noise_scheduler", "validation_negative_prompt_2", "model_card_safe_for_work", "seed_for_each_device",
    "evaluation_type", "eval_steps_interval", "hub_private_repo", "tracker_image_layout", "inference_scheduler_timestep_spacing",
}
# SimpleTuner's current key name -> the name this trainer (and older SimpleTuner configs) use.
KEY_ALIASES = {
    "checkpoint_step_interval": "checkpointing_steps",
    "checkpointing_interval": "checkpointing_steps",
    "validation_step_interval": "validation_steps",
    "validation_disable": "disable_validation",
    "validation_guidance_scale": "validation_guidance",
    "caption_dropout": "caption_dropout_probability",
    "t5_max_length": "tokenizer_max_length",
}
# Backend keys sd-demo has no use for: named once, then ignored.
IGNORED_BACKEND_KEYS = {
    "crop_aspect_buckets", "probability", "vae_cache_clear_each_epoch", "skip_file_discovery",
    "preserve_data_backend_cache", "metadata_backend", "is_regularisation_data", "is_regularization_data",
    "hash_filenames", "caption_filter_list", "write_batch_size", "read_batch_size", "default",
    "scan_for_errors", "text_embeds", "image_embeds", "cache_file_suffix",
}
# Image options that may sit in config.json (defaults for every image backend) or on a backend.
IMAGE_OPTION_KEYS = (
    "resolution_type", "crop", "crop_style", "crop_aspect", "minimum_image_size", "maximum_image_size",
    "target_downsample_size", "minimum_aspect_ratio", "maximum_aspect_ratio",
)
CROP_STYLES = ("center", "centre", "random", "corner")
CROP_ASPECTS = ("square", "preserve")
T5_LENGTH_WARNING = 154  # SimpleTuner caps SD3's T5 sequence here: longer is known to degrade SD3

# Keys whose unsupported values must stop the run: key -> (accepted values, why)
CRITICAL_VALUES = {
    "model_type": ({"lora"}, "this trainer only trains LoRA adapters"),
    "model_family": ({"sd3"}, "this trainer only supports Stable Diffusion 3 / 3.5"),
    "lora_type": ({"standard"}, "only peft LoRA is supported (no LyCORIS)"),
    "base_model_precision": ({"no_change"}, "base-model quantisation is not supported"),
    "resolution_type": ({"pixel", "pixel_area", "area"}, "resolution must be pixels or an area"),
    "grad_clip_method": ({"norm", "value"}, "gradients are clipped by norm or by value"),
    "t5_padding": ({"unmodified", "zero"}, "T5 padding is kept or zeroed"),
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
    prepend_instance_prompt: bool = False
    only_instance_prompt: bool = False
    resolution: int | None = None
    resolution_type: str = "pixel"  # pixel: short side = resolution; pixel_area: about resolution² pixels
    crop: bool = False  # False: the whole image is resized into its aspect bucket
    crop_style: str = "center"
    crop_aspect: str = "preserve"  # with crop: square = every image R x R
    minimum_image_size: int | None = None
    maximum_image_size: int | None = None
    target_downsample_size: int | None = None
    minimum_aspect_ratio: float | None = None
    maximum_aspect_ratio: float | None = None
    repeats: int = 0
    max_num_samples: int | None = None
    cache_dir_vae: Path | None = None


@dataclass
class TrainConfig:
    pretrained_model_name_or_path: Path = Path()
    output_dir: Path = Path("output")
    resolution: int = 1024
    resolution_type: str = "pixel"
    minimum_image_size: int | None = None
    aspect_bucket_alignment: int | None = None  # None: 64 px, 16 px below 512 px resolution
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
    lora_target_modules: tuple[str, ...] | None = None  # peft_lora_target_modules: wins over lora_target
    export_comfyui: bool = False
    max_grad_norm: float = 1.0
    grad_clip_method: str = "norm"
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
    random_flip: bool = False  # also train on the mirrored image (both latents cached)
    tokenizer_max_length: int = 154
    t5_padding: str = "unmodified"
    gradient_checkpointing: bool | None = None  # None: on at resolution >= 768
    vae_batch_size: int = 4
    dataloader_prefetch_qlen: int = 4  # batches prepared ahead in a background thread; 0: each on its step
    cache_ram_budget_mb: int = 1024  # latents + embeddings stay in memory when their cache files total at most this
    process_group_timeout: int = 7200  # seconds a rank may wait for the others (cache encoding)
    checkpointing_steps: int = 0
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    validation_steps: int = 0
    validation_prompt: str | None = None
    validation_prompts: list[str] = field(default_factory=list)  # all prompts rendered (first = validation_prompt)
    validation_negative_prompt: str = ""
    validation_num_inference_steps: int = 20
    validation_guidance: float = 5.0
    validation_resolution: tuple[int, int] | None = None  # (width, height)
    validation_seed: int | None = None
    disable_validation: bool = False
    tracker_run_name: str | None = None
    data_backend_config: Path | None = None
    image_backends: list[ImageBackend] = field(default_factory=list)
    text_cache_dir: Path | None = None
    source: Path | None = None  # the config.json this came from


_FIELD_TYPES = {f.name: f.type for f in fields(TrainConfig)}
_SPECIAL_FIELDS = {"image_backends", "text_cache_dir", "source", "validation_resolution", "validation_prompts",
                   "lora_target_modules", "resolution_type"}


class _Named:
    """Names each ignored or unknown key once per config load."""

    def __init__(self):
        self.seen: set[str] = set()

    def ignored(self, key: str, value, where: Path) -> None:
        if key not in self.seen:
            self.seen.add(key)
            log.warning("config: %s=%s has no effect in sd-demo; ignored (%s)", key, short(value), where.name)

    def unknown(self, key: str, value, where: Path) -> None:
        if key not in self.seen:
            self.seen.add(key)
            log.warning("config: unknown key %s=%s ignored (%s)", key, short(value), where.name)


def short(value, limit: int = 80) -> str:
    """A value as it may appear in a log line: repr, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


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


def expand_placeholders(value, model_family: str):
    """`{model_family}` in cache paths, as SimpleTuner writes them."""
    if isinstance(value, str):
        return value.replace("{model_family}", model_family)
    return value


def _convert(name: str, value, kind: str, where: Path):
    try:
        if "bool" in kind:
            if isinstance(value, str):
                return value.strip().lower() not in ("", "0", "no", "off", "false")
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
        if isinstance(value, (dict, list)):
            raise ValueError
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {name}={short(value)} is not a valid {kind.split()[0].split('|')[0]}") from None


def parse_size(value, name: str, where: Path) -> tuple[int, int]:
    """`1024`, `"1024"` or `"1024x768"` (SimpleTuner's WIDTHxHEIGHT) -> (width, height), multiples of 16."""
    text = str(value).strip().lower()
    if "," in text:  # SimpleTuner allows a list of sizes; sd-demo renders the first
        log.warning("config: %s=%s: only the first size is used", name, short(value))
        text = text.split(",")[0].strip()
    parts = text.split("x")
    if len(parts) == 1:
        parts = parts * 2
    try:
        width, height = (int(float(part)) for part in parts)
    except ValueError:
        raise ConfigError(f"{where}: {name}={short(value)} is not a size (e.g. 1024 or \"1024x768\")") from None
    if len(parts) != 2 or min(width, height) < 64 or width % 16 or height % 16:
        raise ConfigError(f"{where}: {name}={short(value)} must be WIDTHxHEIGHT, each >= 64 and a multiple of 16")
    return width, height


def _check_critical(options: dict, where: Path) -> None:
    for key, (accepted, why) in CRITICAL_VALUES.items():
        if key in options and str(options[key]).lower() not in accepted:
            raise ConfigError(f"{where}: {key}={short(options[key])} is not supported ({why}; use {'/'.join(sorted(accepted))})")
    for key, why in CRITICAL_FLAGS.items():
        if options.get(key):
            raise ConfigError(f"{where}: {key} is set but {why}")


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: invalid JSON ({error})") from None


def _resolution_in_pixels(value, resolution_type: str, where: Path) -> int:
    """SimpleTuner's `area` gives megapixels (1.0 = 1024 x 1024): sd-demo trains it as pixel_area."""
    if resolution_type == "area":
        megapixels = _convert("resolution", value, "float", where)
        return max(64, int(round(math.sqrt(megapixels) * 1024 / 16)) * 16)
    return _convert("resolution", value, "int", where)


def load_config(path: Path) -> TrainConfig:
    path = Path(path)
    raw = _read_json(path, "config file")
    options = normalise_keys(raw, path)
    _check_critical(options, path)
    named = _Named()
    family = str(options.get("model_family", "sd3"))
    options = {KEY_ALIASES.get(name, name): expand_placeholders(value, family) for name, value in options.items()}

    config = TrainConfig(source=path)
    resolution_type = str(options.get("resolution_type", "pixel")).lower()
    config.resolution_type = "pixel_area" if resolution_type == "area" else resolution_type
    for name, value in options.items():
        if name in ("model_type", "model_family", "lora_type", "base_model_precision", "resolution_type", *IMAGE_OPTION_KEYS[1:]):
            continue
        _apply_option(config, name, value, resolution_type, path, named)
    _settle(config, raw, options)
    validate(config, path)
    if config.data_backend_config is None:
        raise ConfigError(f"{path}: data_backend_config is missing (path to multidatabackend.json)")
    image_defaults = {key: options[key] for key in IMAGE_OPTION_KEYS if key in options}
    _load_backends(config, _relative_to_cwd(config.data_backend_config), family, image_defaults, named)
    return config


def _apply_option(config: TrainConfig, name: str, value, resolution_type: str, path: Path, named: _Named) -> None:
    """One (normalised, aliased) config key onto `config`; ignored and unknown keys are reported through `named`."""
    if name == "resolution":
        config.resolution = _resolution_in_pixels(value, resolution_type, path)
    elif name == "validation_resolution":
        config.validation_resolution = parse_size(value, name, path)
    elif name == "validation_prompts":
        config.validation_prompts = _prompt_list(value, name, path)
    elif name == "user_prompt_library":
        config.validation_prompts += _prompt_library(_relative_to_cwd(Path(str(value))))
    elif name == "peft_lora_target_modules":
        config.lora_target_modules = tuple(str(item) for item in (value if isinstance(value, list) else [value]))
    elif name == "flow_use_uniform_schedule":
        config.weighting_scheme = "none"
    elif name in _FIELD_TYPES and name not in _SPECIAL_FIELDS:
        setattr(config, name, _convert(name, value, str(_FIELD_TYPES[name]), path))
    elif name in IGNORED_KEYS:
        if name == "report_to" and str(value).lower() in ("none", ""):
            return
        named.ignored(name, value, path)
    elif name not in CRITICAL_FLAGS:
        named.unknown(name, value, path)


def _settle(config: TrainConfig, raw: dict, options: dict) -> None:
    """What follows from the keys together: an explicit false, the run name, the validation prompts' order."""
    if any(str(key).lstrip("-") == "gradient_checkpointing" for key in raw) and "gradient_checkpointing" not in options:
        config.gradient_checkpointing = False  # an explicit false means off, not "decide by resolution"
    if config.tracker_run_name is None and options.get("train_id"):
        config.tracker_run_name = str(options["train_id"])
    if config.validation_prompt:
        config.validation_prompts = [config.validation_prompt] + [p for p in config.validation_prompts if p != config.validation_prompt]
    elif config.validation_prompts:
        config.validation_prompt = config.validation_prompts[0]


def _prompt_list(value, name: str, where: Path) -> list[str]:
    items = value if isinstance(value, list) else [value]
    prompts = [str(item.get("prompt", "")) if isinstance(item, dict) else str(item) for item in items]
    if not all(p.strip() for p in prompts):
        raise ConfigError(f"{where}: {name} holds an empty prompt")
    return [p.strip() for p in prompts]


def _prompt_library(path: Path) -> list[str]:
    """SimpleTuner's user prompt library: {"name": "prompt"} (or {"name": {"prompt": ...}})."""
    raw = _read_json(path, "user_prompt_library")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object of name -> prompt")
    return _prompt_list(list(raw.values()), "user_prompt_library", path)


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
    need(config.lora_alpha is None or config.lora_alpha > 0, "lora_alpha must be > 0")
    need(config.lora_target in LORA_TARGETS, f"lora_target={config.lora_target!r} is not one of {', '.join(LORA_TARGETS)}")
    need(config.optimizer.startswith("adamw") and config.optimizer != "adamw8bit", f"optimizer={config.optimizer!r} is not supported (adamw, adamw_bf16)")
    need(config.mixed_precision in (None, *MIXED_PRECISION), f"mixed_precision={config.mixed_precision!r} is not one of {', '.join(MIXED_PRECISION)}")
    need(config.weighting_scheme in ("logit_normal", "none"), f"weighting_scheme={config.weighting_scheme!r} is not supported (logit_normal, none)")
    need(0.0 <= config.caption_dropout_probability < 1.0, "caption_dropout_probability must be in [0, 1)")
    need(1 <= config.tokenizer_max_length <= 512, "tokenizer_max_length must be in 1..512")
    need(config.checkpointing_steps >= 0 and config.validation_steps >= 0, "checkpointing_steps/validation_steps must be >= 0")
    need(config.aspect_bucket_alignment in (None, 8, 16, 32, 64), "aspect_bucket_alignment must be 16, 32 or 64")
    need(config.process_group_timeout > 0, "process_group_timeout must be > 0 seconds")
    need(config.dataloader_prefetch_qlen >= 0 and config.cache_ram_budget_mb >= 0,
         "dataloader_prefetch_qlen/cache_ram_budget_mb must be >= 0")
    if config.tokenizer_max_length > T5_LENGTH_WARNING:
        log.warning("config: tokenizer_max_length=%d is above %d; SD3 is known to degrade with longer T5 sequences",
                    config.tokenizer_max_length, T5_LENGTH_WARNING)
    if config.resume_from_checkpoint in ("", "none", "None"):
        config.resume_from_checkpoint = None


def _backend_option(entry: dict, defaults: dict, key: str, kind: str, path: Path, fallback=None):
    value = entry.get(key, defaults.get(key))
    if value is None:
        return fallback
    return _convert(key, value, kind, path)


def _load_backends(config: TrainConfig, path: Path, family: str, defaults: dict, named: _Named) -> None:
    raw = _read_json(path, "data backend config")
    if not isinstance(raw, list):
        raise ConfigError(f"{path}: expected a JSON list of data backends")
    for number, entry in enumerate(raw):
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: entry {number} is not an object")
        entry = {key: expand_placeholders(value, family) for key, value in normalise_keys(entry, path).items()}
        name = entry.get("id", f"#{number}")
        if entry.get("disabled") or entry.get("disable"):
            continue
        dataset_type = entry.get("dataset_type", "image")
        if dataset_type == "text_embeds":
            if entry.get("type", "local") != "local":
                raise ConfigError(f"{path}: backend {name}: type={entry['type']!r} is not supported (local only)")
            if entry.get("cache_dir"):
                config.text_cache_dir = _relative_to_cwd(Path(entry["cache_dir"]))
            for key in set(entry) - {"id", "type", "dataset_type", "default", "cache_dir", "disabled", "disable"}:
                named.unknown(f"{name}.{key}", entry[key], path)
            continue
        if dataset_type != "image":
            raise ConfigError(f"{path}: backend {name}: dataset_type={dataset_type!r} is not supported (image, text_embeds)")
        config.image_backends.append(_image_backend(config, entry, str(name), path, defaults, named))
    if not config.image_backends:
        raise ConfigError(f"{path}: no enabled image backend")
    resolutions = {b.resolution or config.resolution for b in config.image_backends}
    if len(resolutions) > 1:
        raise ConfigError(f"{path}: image backends use different resolutions {sorted(resolutions)}; use one")
    config.resolution = resolutions.pop()


BACKEND_KEYS = {
    "id", "type", "dataset_type", "instance_data_dir", "caption_strategy", "instance_prompt", "prepend_instance_prompt",
    "only_instance_prompt", "resolution", "repeats", "max_num_samples", "cache_dir_vae", "disabled", "disable",
    *IMAGE_OPTION_KEYS,
}


def _image_backend(config: TrainConfig, entry: dict, name: str, path: Path, defaults: dict, named: _Named) -> ImageBackend:
    if entry.get("type", "local") != "local":
        raise ConfigError(f"{path}: backend {name}: type={entry.get('type')!r} is not supported (local only)")
    strategy = entry.get("caption_strategy", "textfile")
    if strategy not in CAPTION_STRATEGIES:
        raise ConfigError(f"{path}: backend {name}: caption_strategy={strategy!r} is not supported ({', '.join(CAPTION_STRATEGIES)})")
    resolution_type = str(entry.get("resolution_type", defaults.get("resolution_type", config.resolution_type))).lower()
    if resolution_type not in ("pixel", "pixel_area", "area"):
        raise ConfigError(f"{path}: backend {name}: resolution_type={resolution_type!r} is not supported (pixel, pixel_area, area)")
    if "instance_data_dir" not in entry:
        raise ConfigError(f"{path}: backend {name}: instance_data_dir is missing")
    crop_style = str(entry.get("crop_style", defaults.get("crop_style", "center"))).lower()
    crop_aspect = str(entry.get("crop_aspect", defaults.get("crop_aspect", "preserve"))).lower()
    if crop_style not in CROP_STYLES:
        raise ConfigError(f"{path}: backend {name}: crop_style={crop_style!r} is not supported ({', '.join(CROP_STYLES)})")
    if crop_aspect not in CROP_ASPECTS:
        log.warning("backend %s: crop_aspect=%s is treated as 'preserve' (supported: square, preserve)", name, short(crop_aspect))
        crop_aspect = "preserve"
    for key in sorted(set(entry) - BACKEND_KEYS):
        if key in IGNORED_BACKEND_KEYS:
            named.ignored(f"{name}.{key}", entry[key], path)
        else:
            named.unknown(f"{name}.{key}", entry[key], path)
    backend = ImageBackend(
        id=name,
        instance_data_dir=_relative_to_cwd(Path(entry["instance_data_dir"])),
        caption_strategy=strategy,
        instance_prompt=entry.get("instance_prompt"),
        prepend_instance_prompt=bool(entry.get("prepend_instance_prompt")),
        only_instance_prompt=bool(entry.get("only_instance_prompt")),
        resolution=_resolution_in_pixels(entry["resolution"], resolution_type, path) if "resolution" in entry else None,
        resolution_type="pixel_area" if resolution_type == "area" else resolution_type,
        crop=bool(entry.get("crop", defaults.get("crop", False))),
        crop_style="center" if crop_style == "centre" else crop_style,
        crop_aspect=crop_aspect,
        minimum_image_size=_backend_option(entry, defaults, "minimum_image_size", "int", path),
        maximum_image_size=_backend_option(entry, defaults, "maximum_image_size", "int", path),
        target_downsample_size=_backend_option(entry, defaults, "target_downsample_size", "int", path),
        minimum_aspect_ratio=_backend_option(entry, defaults, "minimum_aspect_ratio", "float", path),
        maximum_aspect_ratio=_backend_option(entry, defaults, "maximum_aspect_ratio", "float", path),
        repeats=_convert("repeats", entry.get("repeats", 0), "int", path),
        max_num_samples=_backend_option(entry, {}, "max_num_samples", "int", path),
        cache_dir_vae=_relative_to_cwd(Path(entry["cache_dir_vae"])) if entry.get("cache_dir_vae") else None,
    )
    if backend.resolution and backend.resolution != config.resolution:
        log.info("backend %s trains at %d px (config resolution %d)", backend.id, backend.resolution, config.resolution)
    if (backend.prepend_instance_prompt or backend.only_instance_prompt or strategy == "instanceprompt") and not backend.instance_prompt:
        raise ConfigError(f"{path}: backend {name}: instance_prompt is missing (needed by prepend/only_instance_prompt)")
    return backend
