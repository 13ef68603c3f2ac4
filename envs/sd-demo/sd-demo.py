"""sd-demo: the platform entry for SD3 / SD3.5 LoRA training.

    python sd-demo.py --model_path=DIR --pic_relative_path=DATASET --train_id=ID [--max_steps=N ...]

Validates the arguments, unpacks the dataset into SimpleTuner's textfile layout,
writes config/config.json, config/multidatabackend.json and config/config.env into a
work directory, runs `bash train.sh` there and relays its output line by line.
SIGTERM/SIGINT are forwarded to the whole training process group; the trainer saves a
checkpoint and this script exits 130.

Directories: output_dir = --output_dir, else $ENVMGR_OUTPUT_DIR, else ./output.
work dir = $SD_DEMO_WORK_DIR, else `sd-demo-work` next to output_dir. Nothing is
written next to this file (the method folder may be read-only).

Exit codes: 0 done, 1 dataset/model/training error, 2 bad argument or config, 130 stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

METHOD_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(METHOD_DIR))

from sd_trainer.config import CROP_ASPECTS, CROP_STYLES, LORA_TARGETS  # noqa: E402
from sd_trainer.dataset_prep import DatasetError, cap_caption, prepare_dataset  # noqa: E402
from sd_trainer.model_folder import ModelError, check_model_folder  # noqa: E402

EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


class OneLineParser(argparse.ArgumentParser):
    """argparse, but errors are a single line and exit 2."""

    def error(self, message: str):
        print(f"sd-demo: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _number(kind, low, high, name_hint=""):
    def parse(text: str):
        try:
            value = kind(text)
            if kind is float and not math.isfinite(value):
                raise ValueError
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text} is out of range ({low} to {high}{name_hint})")
        return value

    return parse


def _resolution(text: str) -> int:
    value = _number(int, 64, 4096)(text)
    if value % 16:
        raise argparse.ArgumentTypeError(f"{value} is not a multiple of 16")
    return value


def _non_empty(text: str) -> str:
    if not text.strip() or "\n" in text:
        raise argparse.ArgumentTypeError("must be a non-empty single-line string")
    return text.strip()


def _switch(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("", "true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _resume(text: str) -> str | None:
    lowered = text.strip().lower()
    if lowered in ("", "true", "1", "yes", "latest"):
        return "latest"
    if lowered in ("false", "0", "no", "none"):
        return None
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="sd-demo.py", description="SD3 LoRA training (SimpleTuner-compatible config)",
                           allow_abbrev=False)
    add = parser.add_argument
    add("--model_path", type=Path, required=True, help="local diffusers SD3 / SD3.5 folder")
    add("--pic_relative_path", type=Path, required=True, help="dataset: zip, tar.gz or directory")
    add("--train_id", type=_non_empty, required=True, help="the platform's run id (used as run name)")
    add("--max_steps", type=_number(int, 1, 10_000_000), default=100)
    add("--batch_size", type=_number(int, 1, 1024), default=1)
    add("--learning_rate", type=_number(float, 1e-12, 1.0), default=1e-4)
    add("--warmup_steps", type=_number(int, 0, 10_000_000), default=0)
    add("--resolution", type=_resolution, default=1024, help="training size in px (multiple of 16)")
    add("--lora_rank", type=_number(int, 1, 1024), default=16)
    add("--seed", type=_number(int, 0, 2**32 - 1), default=42)
    add("--output_dir", type=Path, default=None)
    add("--resume", type=_resume, nargs="?", const="latest", default=None,
        help="continue from the latest checkpoint in output_dir (or a given checkpoint folder)")
    add("--gradient_accumulation_steps", type=_number(int, 1, 1024), default=1)
    add("--lr_scheduler", choices=("constant", "linear", "cosine", "polynomial"), default="constant")
    add("--mixed_precision", choices=("bf16", "fp16", "no"), default=None,
        help="default: $MIXED_PRECISION or bf16 (fp32 on CPU)")
    add("--checkpointing_steps", type=_number(int, 0, 10_000_000), default=None, help="default: max_steps/4")
    add("--validation_steps", type=_number(int, 0, 10_000_000), default=None, help="default: max_steps/4")
    add("--validation_prompt", type=_non_empty, action="append", default=None,
        help="repeat for several prompts, each with a fixed seed (default: the first caption)")
    add("--validation_num_inference_steps", type=_number(int, 1, 1000), default=20)
    add("--minimum_image_size", type=_number(int, 0, 16384), default=None,
        help="drop smaller images instead of upscaling them")
    add("--maximum_image_size", type=_number(int, 64, 65536), default=None,
        help="downsample larger images to this size first")
    add("--resolution_type", choices=("pixel", "pixel_area"), default="pixel_area",
        help="pixel_area: each bucket holds about resolution² pixels; pixel: the short side is resolution")
    add("--crop", type=_switch, nargs="?", const=True, default=False,
        help="crop to the bucket instead of resizing the whole image into it")
    add("--crop_style", choices=tuple(s for s in CROP_STYLES if s != "centre"), default="center")
    add("--crop_aspect", choices=CROP_ASPECTS, default="preserve", help="with --crop: square crops every image to R x R")
    add("--random_flip", type=_switch, nargs="?", const=True, default=False, help="also train on mirrored images")
    add("--trigger_word", "--instance_prompt", dest="trigger_word", type=_non_empty, default=None,
        help="prepended to every caption (SimpleTuner's instance_prompt)")
    add("--caption_dropout", type=_number(float, 0.0, 0.99), default=0.0,
        help="probability of training a sample with the empty caption")
    add("--lora_alpha", type=_number(float, 1e-6, 65536.0), default=None, help="default: lora_rank")
    add("--lora_target", choices=tuple(LORA_TARGETS), default="attention",
        help="attention, attention+context (+ context-stream projections), attention+context+ff / all (+ feed-forward)")
    add("--validation_seed", type=_number(int, 0, 2**32 - 1), default=None, help="prompt i uses this + i (default: --seed)")
    add("--export_comfyui", type=_switch, nargs="?", const=True, default=False,
        help="also write pytorch_lora_weights_comfyui.safetensors (ComfyUI key names with .alpha tensors)")
    add("--gradient_checkpointing", type=_switch, nargs="?", const=True, default=None,
        help="trade compute for memory (default: on at resolution >= 768)")
    add("--cache_dir", type=Path, default=None,
        help="latent/text cache folder, shareable between runs (default: $SD_DEMO_CACHE_DIR, else <work dir>/cache)")
    return parser


def fail(message: str, code: int = EXIT_ERROR) -> int:
    print(f"sd-demo: error: {message}", file=sys.stderr, flush=True)
    return code


# ---------------------------------------------------------------- config files


def write_configs(args, output_dir: Path, work_dir: Path, dataset_dir: Path, validation_prompts: list[str]) -> Path:
    """SimpleTuner's config.json, multidatabackend.json and config.env (existing env vars win).

    Written with SimpleTuner's current key names (checkpoint_step_interval, ...)."""
    config_dir = work_dir / "config"
    config_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = (args.cache_dir or Path(os.environ.get("SD_DEMO_CACHE_DIR") or work_dir / "cache")).resolve()
    every = max(1, args.max_steps // 4)
    backend_file = config_dir / "multidatabackend.json"
    config = {
        "--model_type": "lora",
        "--model_family": "sd3",
        "--pretrained_model_name_or_path": str(args.model_path.resolve()),
        "--output_dir": str(output_dir),
        "--resolution": args.resolution,
        "--resolution_type": args.resolution_type,
        "--train_batch_size": args.batch_size,
        "--max_train_steps": args.max_steps,
        "--gradient_accumulation_steps": args.gradient_accumulation_steps,
        "--learning_rate": args.learning_rate,
        "--lr_scheduler": args.lr_scheduler,
        "--lr_warmup_steps": args.warmup_steps,
        "--lora_rank": args.lora_rank,
        "--lora_alpha": args.lora_alpha if args.lora_alpha is not None else args.lora_rank,
        "--lora_target": args.lora_target,
        "--lora_type": "standard",
        "--caption_dropout_probability": args.caption_dropout,
        "--random_flip": args.random_flip,
        "--export_comfyui": args.export_comfyui,
        "--seed": args.seed,
        "--optimizer": "adamw_bf16",
        "--checkpoint_step_interval": every if args.checkpointing_steps is None else args.checkpointing_steps,
        "--checkpoints_total_limit": 3,
        "--validation_step_interval": every if args.validation_steps is None else args.validation_steps,
        "--validation_prompt": validation_prompts[0],
        "--validation_prompts": validation_prompts,
        "--validation_num_inference_steps": args.validation_num_inference_steps,
        "--data_backend_config": str(backend_file),
        "--report_to": "none",
        "--tracker_run_name": args.train_id,
        "--resume_from_checkpoint": args.resume or False,
        "--push_to_hub": False,
    }
    if args.validation_seed is not None:
        config["--validation_seed"] = args.validation_seed
    if args.gradient_checkpointing is not None:  # unset: the trainer turns it on at resolution >= 768
        config["--gradient_checkpointing"] = args.gradient_checkpointing
    image_backend = {
        "id": "sd-demo-dataset",
        "type": "local",
        "dataset_type": "image",
        "instance_data_dir": str(dataset_dir),
        "caption_strategy": "textfile",
        "resolution": args.resolution,
        "resolution_type": args.resolution_type,
        "crop": args.crop,
        "crop_style": args.crop_style,
        "crop_aspect": args.crop_aspect,
        "cache_dir_vae": str(cache_dir / "vae"),
        "repeats": 0,
    }
    if args.minimum_image_size:
        config["--minimum_image_size"] = args.minimum_image_size
        image_backend["minimum_image_size"] = args.minimum_image_size
    if args.maximum_image_size:
        image_backend["maximum_image_size"] = args.maximum_image_size
    if args.trigger_word:
        image_backend.update(instance_prompt=args.trigger_word, prepend_instance_prompt=True)
    backends = [
        image_backend,
        {"id": "text-embeds", "type": "local", "dataset_type": "text_embeds", "default": True,
         "cache_dir": str(cache_dir / "text")},
    ]
    env_lines = [
        "# written by sd-demo.py; variables already set in the environment win",
        'export TRAINING_NUM_PROCESSES="${TRAINING_NUM_PROCESSES:-1}"',
        'export TRAINING_NUM_MACHINES="${TRAINING_NUM_MACHINES:-1}"',
        f'export MIXED_PRECISION="${{MIXED_PRECISION:-{args.mixed_precision or "bf16"}}}"',
        'export TRAINING_DYNAMO_BACKEND="${TRAINING_DYNAMO_BACKEND:-no}"',
        'export CONFIG_BACKEND="${CONFIG_BACKEND:-json}"',
        "export DISABLE_UPDATES=1",
    ]
    if args.mixed_precision:  # an explicit flag beats the environment
        env_lines[3] = f'export MIXED_PRECISION="{args.mixed_precision}"'
    (config_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    backend_file.write_text(json.dumps(backends, indent=2) + "\n", encoding="utf-8")
    (config_dir / "config.env").write_text("\n".join(env_lines) + "\n", encoding="utf-8")
    return config_dir


# ---------------------------------------------------------------- running train.sh


def child_environment(work_dir: Path) -> dict:
    env = dict(os.environ)
    cache = work_dir / ".cache"
    env["SD_DEMO_PYTHON"] = sys.executable
    env["SD_DEMO_STATUS_FILE"] = str(work_dir / ".trainer-status")
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("MPLCONFIGDIR", str(cache / "matplotlib"))
    home = env.get("HOME", "")
    if not home or not os.access(home, os.W_OK):  # e.g. a non-root uid in an image
        env["HOME"] = str(cache / "home")
        env.setdefault("XDG_CACHE_HOME", str(cache))
        env.setdefault("HF_HOME", str(cache / "huggingface"))
        env.setdefault("TRITON_CACHE_DIR", str(cache / "triton"))
        env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache / "inductor"))
    for key in ("MPLCONFIGDIR", "HOME"):
        Path(env[key]).mkdir(parents=True, exist_ok=True)
    return env


def run_training(work_dir: Path) -> int:
    status_file = work_dir / ".trainer-status"
    status_file.unlink(missing_ok=True)
    child = subprocess.Popen(
        ["bash", str(METHOD_DIR / "train.sh")], cwd=work_dir, env=child_environment(work_dir),
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, bufsize=1, start_new_session=True,
    )
    stopped: list[int] = []

    def forward(signum, _frame):
        stopped.append(signum)
        try:
            os.killpg(child.pid, signum)
        except ProcessLookupError:
            pass

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        for line in child.stdout:  # ends when every process of the group has closed stdout
            sys.stdout.write(line)
            sys.stdout.flush()
        code = child.wait()
        _wait_for_group(child.pid)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if status_file.is_file() and status_file.read_text().strip().lstrip("-").isdigit():
        code = int(status_file.read_text().strip())
    if stopped:
        return EXIT_INTERRUPTED
    return code if code >= 0 else 128 - code


def _wait_for_group(group: int, limit_s: float = 600.0) -> None:
    """The trainer can outlive bash/accelerate while saving its last checkpoint."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.2)


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    for extra in unknown:
        if extra.startswith("--"):
            print(f"sd-demo: warning: ignoring unknown argument {extra.split('=')[0]}", file=sys.stderr)
    output_dir = (args.output_dir or Path(os.environ.get("ENVMGR_OUTPUT_DIR") or "output")).resolve()
    work_dir = Path(os.environ.get("SD_DEMO_WORK_DIR") or output_dir.parent / "sd-demo-work").resolve()

    try:
        check_model_folder(args.model_path)
    except ModelError as error:
        return fail(str(error))
    for folder, name in ((output_dir, "output_dir"), (work_dir, "work dir (SD_DEMO_WORK_DIR)")):
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            return fail(f"{name} {folder} cannot be created ({error.strerror})")
        if not os.access(folder, os.W_OK):
            return fail(f"{name} {folder} is not writable")

    dataset_dir = work_dir / "dataset"
    print(f"sd-demo: preparing dataset {args.pic_relative_path}", file=sys.stderr, flush=True)
    try:
        report = prepare_dataset(args.pic_relative_path, dataset_dir, work_dir / "scratch")
    except DatasetError as error:
        return fail(str(error))
    except OSError as error:
        return fail(f"dataset {args.pic_relative_path}: {error}")
    finally:
        shutil.rmtree(work_dir / "scratch", ignore_errors=True)  # the extracted copy; dataset/ has what counts
    for warning in report.warnings:
        print(f"sd-demo: warning: {warning}", file=sys.stderr)
    print(f"sd-demo: {report.images} images ready in {dataset_dir} "
          f"({report.captions_from_jsonl} captions from {report.jsonl or 'no JSONL'}, "
          f"{report.captions_from_txt} from .txt files)", file=sys.stderr, flush=True)

    first_caption, _ = cap_caption(next(iter(sorted(dataset_dir.glob("*.txt")))).read_text(encoding="utf-8").strip())
    if args.trigger_word and not first_caption.startswith(args.trigger_word):
        first_caption = f"{args.trigger_word}, {first_caption}"
    prompts = [cap_caption(prompt)[0] for prompt in args.validation_prompt or [first_caption]]
    write_configs(args, output_dir, work_dir, dataset_dir, prompts)
    return run_training(work_dir)


if __name__ == "__main__":
    sys.exit(main())
