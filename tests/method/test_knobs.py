"""The platform's knobs on sd-demo.py, end to end, and what each changes in the trainer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import events_of, run_entry, textfile_dataset, write_trainer_config
from safetensors import safe_open
from safetensors.torch import load_file
from sd_trainer import data
from sd_trainer.config import load_config
from sd_trainer.dataset_prep import MAX_CAPTION_CHARS

HUGE_CAPTION = "tag " * (5 * 1024 * 1024 // 4)
FAST = ["--resolution=64", "--lora_rank=4", "--validation_num_inference_steps=2", "--learning_rate=1e-3"]


@pytest.fixture(scope="module")
def knob_run(tmp_path_factory, tiny_model):
    """One end-to-end run with every knob set, on a folder dataset where one caption is 5 MB."""
    root = tmp_path_factory.mktemp("knobs")
    images = textfile_dataset(root / "dataset", count=4)
    (images / "img0.txt").write_text(HUGE_CAPTION)
    (root / "run").mkdir()
    result = run_entry([f"--model_path={tiny_model}", f"--pic_relative_path={images}", "--train_id=knobs",
                        "--max_steps=3", "--validation_steps=0", "--trigger_word=sks", "--caption_dropout=0.25",
                        "--lora_alpha=2", "--lora_target=attention+context+ff", "--validation_prompt=a red circle",
                        "--validation_prompt=a blue square", "--validation_seed=100", "--export_comfyui",
                        f"--cache_dir={root / 'shared-cache'}", *FAST], cwd=root / "run")
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run", events_of(result.stdout), result


def test_a_5mb_caption_is_cut_and_never_printed(knob_run):
    run_dir, _events, result = knob_run
    longest = max((result.stdout + result.stderr).splitlines(), key=len)
    assert len(longest) < 2000, longest[:300]
    assert "caption(s) longer than" in result.stderr
    written = (run_dir / "sd-demo-work" / "dataset" / "img0.txt").read_text()
    assert len(written) <= MAX_CAPTION_CHARS + 1


def test_knobs_reach_the_config(knob_run):
    run_dir, _events, _result = knob_run
    config = json.loads((run_dir / "sd-demo-work" / "config" / "config.json").read_text())
    assert config["--caption_dropout_probability"] == 0.25 and config["--lora_alpha"] == 2
    assert config["--lora_target"] == "attention+context+ff" and "--checkpoint_step_interval" in config
    assert config["--validation_prompts"] == ["a red circle", "a blue square"]
    backend = json.loads((run_dir / "sd-demo-work" / "config" / "multidatabackend.json").read_text())[0]
    assert backend["instance_prompt"] == "sks" and backend["prepend_instance_prompt"] is True
    assert (run_dir.parent / "shared-cache" / "vae").is_dir() and (run_dir.parent / "shared-cache" / "text").is_dir()


def test_validation_prompts_have_fixed_seeds(knob_run):
    run_dir, events, _result = knob_run
    validation = [e for e in events if e["event"] == "validation"]
    assert [(e["prompt"], e["seed"]) for e in validation] == [(0, 100), (1, 101)]
    assert sorted(p.name for p in (run_dir / "output" / "validation_images").iterdir()) == \
        ["step-000003-1.png", "step-000003.png"]


def test_lora_alpha_and_targets_are_in_the_saved_lora(knob_run):
    run_dir, _events, _result = knob_run
    lora = run_dir / "output" / "pytorch_lora_weights.safetensors"
    keys = set(load_file(str(lora)))
    for module in ("attn.to_q", "attn.add_q_proj", "ff.net.2", "ff_context.net.0.proj"):
        assert any(f".{module}.lora_A" in key for key in keys), module
    with safe_open(str(lora), "pt") as handle:
        metadata = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert metadata["transformer.lora_alpha"] == 2 and metadata["transformer.r"] == 4


def test_comfyui_export_matches_the_diffusers_lora(knob_run):
    run_dir, _events, _result = knob_run
    diffusers_file = load_file(str(run_dir / "output" / "pytorch_lora_weights.safetensors"))
    comfy = load_file(str(run_dir / "output" / "pytorch_lora_weights_comfyui.safetensors"))
    down_keys = [key for key in comfy if key.endswith(".lora_down.weight")]
    assert down_keys and len(comfy) == 3 * len(down_keys) == 3 * len(diffusers_file) // 2
    for key in down_keys:
        name = key[: -len(".lora_down.weight")]
        module = name[len("lora_transformer_"):]
        source = next(k for k in diffusers_file if k.endswith(".lora_A.weight")
                      and k[len("transformer."): -len(".lora_A.weight")].replace(".", "_") == module)
        assert torch.equal(comfy[key], diffusers_file[source])
        assert torch.equal(comfy[f"{name}.lora_up.weight"], diffusers_file[source.replace("lora_A", "lora_B")])
        assert comfy[f"{name}.alpha"].item() == 2.0


def test_trigger_word_is_prepended_once(tmp_path):
    images = textfile_dataset(tmp_path / "images", count=2)
    (images / "img1.txt").write_text("sks, already has it")
    config_path = write_trainer_config(tmp_path, Path("/m"), images)
    backends = json.loads((tmp_path / "multidatabackend.json").read_text())
    backends[0].update(instance_prompt="sks", prepend_instance_prompt=True)
    (tmp_path / "multidatabackend.json").write_text(json.dumps(backends))
    samples = data.discover(load_config(config_path), {})
    assert [s.caption for s in samples] == ["sks, a circle number 0", "sks, already has it"]


def test_caption_dropout_changes_the_conditioning(tmp_path, tiny_model):
    from test_training import losses_of, run_trainer

    images = textfile_dataset(tmp_path / "images", count=2)
    plain = losses_of(run_trainer(write_trainer_config(tmp_path / "a", tiny_model, images, max_train_steps=3))[1])
    dropped = losses_of(run_trainer(write_trainer_config(tmp_path / "b", tiny_model, images, max_train_steps=3,
                                                         caption_dropout_probability=0.9))[1])
    assert plain != pytest.approx(dropped, rel=1e-6)
