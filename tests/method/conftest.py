"""Shared fixtures: a tiny random SD3 model (built once per session) and generated datasets."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

METHOD_DIR = Path(__file__).resolve().parents[2] / "envs" / "sd-demo"
sys.path.insert(0, str(METHOD_DIR))
sys.path.insert(0, str(METHOD_DIR / "tools"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import make_sample_dataset  # noqa: E402

# The trainer's tests run in its venv (`make test-method`: .venv-method, torch CPU). Under a Python without torch
# (a bare `pytest` from the root with .venv) they are left out of collection, and the header says so.
HAS_TORCH = importlib.util.find_spec("torch") is not None
if not HAS_TORCH:
    collect_ignore_glob = ["test_*.py"]


def pytest_report_header(config) -> str | None:
    if HAS_TORCH:
        return None
    return "tests/method: not collected: this Python has no torch (`make test-method` runs them in .venv-method)"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    import make_tiny_model

    out = tmp_path_factory.mktemp("models") / "tiny-sd3"
    make_tiny_model.build_pipeline(seed=0, layers=2).save_pretrained(out, safe_serialization=True)
    return out


@pytest.fixture
def sample_zip(tmp_path) -> Path:
    return make_sample_dataset.write_dataset(tmp_path / "dataset.zip", "zip", count=8, size=128, top_folder="upload")


def run_entry(args: list[str], cwd: Path, env: dict | None = None, method_dir: Path = METHOD_DIR,
              timeout: float = 300) -> subprocess.CompletedProcess:
    """Run sd-demo.py as the platform does (a subprocess, --key=value arguments)."""
    full_env = {key: value for key, value in os.environ.items() if key not in ("ENVMGR_OUTPUT_DIR", "SD_DEMO_WORK_DIR")}
    full_env.update({"HF_HUB_OFFLINE": "1", **(env or {})})
    return subprocess.run([sys.executable, str(method_dir / "sd-demo.py"), *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def events_of(stdout: str) -> list[dict]:
    found = []
    for line in stdout.splitlines():
        if line.startswith("{"):
            found.append(json.loads(line))
    return found


def write_trainer_config(folder: Path, model: Path, images: Path, **options) -> Path:
    """A SimpleTuner-format config.json + multidatabackend.json for in-process trainer runs."""
    folder.mkdir(parents=True, exist_ok=True)
    backends = [
        {"id": "images", "type": "local", "instance_data_dir": str(images), "caption_strategy": "textfile",
         "resolution": options.get("resolution", 64), "cache_dir_vae": str(folder / "cache" / "vae")},
        {"id": "text", "dataset_type": "text_embeds", "default": True, "type": "local", "cache_dir": str(folder / "cache" / "text")},
    ]
    (folder / "multidatabackend.json").write_text(json.dumps(backends))
    config = {
        "--model_type": "lora", "--model_family": "sd3", "--pretrained_model_name_or_path": str(model),
        "--output_dir": str(folder / "output"), "--resolution": 64, "--train_batch_size": 1,
        "--max_train_steps": 4, "--learning_rate": 1e-3, "--lora_rank": 4, "--seed": 7,
        "--data_backend_config": str(folder / "multidatabackend.json"), "--report_to": "none",
        "--validation_num_inference_steps": 2, "--mixed_precision": "no",
    }
    config.update({f"--{key}": value for key, value in options.items()})
    (folder / "config.json").write_text(json.dumps(config))
    return folder / "config.json"


def textfile_dataset(folder: Path, count: int = 2, size: int = 64) -> Path:
    """Images with .txt captions, already in the trainer's layout."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    colours = [(220, 40, 40), (40, 70, 220), (40, 180, 60), (230, 210, 40)]
    for index in range(count):
        image = Image.new("RGB", (size, size), colours[(index + 1) % 4])
        ImageDraw.Draw(image).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=colours[index % 4])
        image.save(folder / f"img{index}.png")
        (folder / f"img{index}.txt").write_text(f"a circle number {index}")
    return folder
