"""spec_hash is opt-in: only the fields marked as shaping the image are hashed, and every spec keeps the
hash (so the image ID) it had before the marking. The expected values were computed with the hash that
dumped every field and dropped the run-only ones by hand."""

from pathlib import Path

import pytest

from envmgr.core.spec import Image, MethodSpec, image_fields, load_spec
from envmgr.core.variants import variant_spec

ENVS = Path(__file__).resolve().parents[2] / "envs"

TINY = {"name": "tiny", "description": "fixture method: two small pure-Python packages", "backend": "poetry",
        "entry": ["python", "main.py"], "gpu": "none", "env": {"TINY_GREETING": "hello"}}
ADDED = {"name": "third", "description": "added from third.zip", "backend": "pip", "python": "3.11",
         "base_image": "bookworm-py311", "source_dir": "source", "lock_dir": "lock", "entry": ["bash", "train.sh"],
         "gpu": "optional", "platform_args": False, "workdir": "method", "verdict": "training",
         "env": {"DISABLE_UPDATES": "1", "HF_HUB_OFFLINE": "1"},
         "adapt": {"pin": {}, "drop": [], "add": {}, "sources": {}}}
EVERYTHING = {
    "name": "everything", "description": "every field set", "backend": "pip", "python": "3.12",
    "base_image": "bookworm-py312", "source_dir": "source", "lock_dir": "lock", "entry": ["python", "t.py"],
    "default_model": "m", "gpu": "none", "platform": "linux-aarch64", "platforms": ["linux-64", "linux-aarch64"],
    "virtual_packages": {"__cuda": "12.4"}, "env": {"A": "1"}, "exclude": ["x"], "platform_args": False,
    "workdir": "method", "success": ["output/*.bin"], "verdict": "training", "dataset_mode": "archive",
    "adapt": {"pin": {"torch": "2.4.0"}, "drop": ["nvidia-smi"], "add": {"rich": "*"}, "sources": {"pt": "mirror"},
              "repository_pins": "requirements-lock.txt", "build_from_source": ["tiny-ext"]},
    "system": {"apt": ["libgl1"]}, "gpu_memory_gb": 12.0, "limits": {"memory": "8g", "shm_size": "1g"},
    "variants": {"old": {"pin": {"torch": "2.3.0"}, "description": "older"}},
}


def test_built_in_methods_keep_their_spec_hash():
    sd_demo = load_spec(ENVS / "sd-demo" / "envmgr.toml")
    assert sd_demo.spec_hash() == "35717ddbb1c0cb55167b22830f852c25024e8e94c6e774b2058fcfe5e231b277"
    assert variant_spec(sd_demo, "cu128").spec_hash() == \
        "7355d8e77c6fdb1c98dbb0778476e335589d901658fa5d1c3a65ca98419c828e"
    conda_demo = load_spec(ENVS / "conda-demo" / "envmgr.toml")
    assert conda_demo.spec_hash() == "db67ec15521cdbbf8d29ca3fed3f461c8e45218849b97a8e7b8e23f03f19ca2f"


@pytest.mark.parametrize(("data", "expected"), [
    (TINY, "c55ec2278df2f2ca72ff42c4ad36fc6d990f112cf46bba617928223cc5db75c5"),
    (ADDED, "f824337a81b08cafffbbe5664871d214765158686458de52f3fcb36ff3792dc6"),
    (EVERYTHING, "0274cbf856f3067818e35ffa568b9cb996161eaa9b6f6962772ff2a6f5cf7d8b"),
], ids=["tiny-fixture", "added-method", "every-field"])
def test_fixture_specs_keep_their_spec_hash(data, expected):
    assert MethodSpec(**data).spec_hash() == expected


class _WithRunField(MethodSpec):
    """The spec model with one more field that only shapes a run (unmarked, as every run-only field is)."""

    run_note: str = "checkpoint every 500 steps"


class _WithImageField(MethodSpec):
    build_flag: Image[str] = "on"


def test_a_run_only_field_keeps_the_image_id():
    for data in (TINY, ADDED, EVERYTHING):
        plain = MethodSpec(**data)
        assert _WithRunField(**data).spec_hash() == plain.spec_hash()
        assert _WithRunField(**data, run_note="another").spec_hash() == plain.spec_hash()


def test_a_field_marked_image_is_hashed():
    assert _WithImageField(**TINY).spec_hash() != MethodSpec(**TINY).spec_hash()
    assert _WithImageField(**TINY, build_flag="off").spec_hash() != _WithImageField(**TINY).spec_hash()


def test_the_run_only_fields_of_today_are_unmarked():
    hashed = image_fields(MethodSpec)
    for name in ("verdict", "dataset_mode", "gpu_memory_gb", "limits", "variants", "variant", "folder", "builtin"):
        assert name not in hashed
    assert set(hashed["adapt"]) == set(MethodSpec.model_fields["adapt"].annotation.model_fields)
