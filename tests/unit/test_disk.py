"""Disk use per method: the engine's image figures, envmgr's cached layers and the runs folder."""

from envmgr.core.config import load_config
from envmgr.core.ui import Reporter
from envmgr.door.context import Context
from envmgr.gc.disk import describe, usage


class FakeEngine:
    """Two images of `third` sharing the base and an environment layer; one image of another method on the base."""

    LAYERS = {"sha256:a": ["base", "env", "m1"], "sha256:b": ["base", "env", "m2"], "sha256:c": ["base", "envc"]}
    SIZES = {"base": 3_000, "env": 1_000, "m1": 10, "m2": 20, "envc": 7_000}

    def image_disk_usage(self):
        return []

    def images(self, label=None, all_=False):
        return [{"Id": "sha256:a", "Labels": {"org.envmgr.method": "third"}},
                {"Id": "sha256:b", "Labels": {"org.envmgr.method": "third"}},
                {"Id": "sha256:c", "Labels": {"org.envmgr.method": "not-here"}}]

    def inspect_image(self, image_id):
        return {"RootFS": {"Layers": [f"sha256:{name}" for name in self.LAYERS[image_id]]}}

    def image_history(self, image_id):
        return [{"Size": self.SIZES[name]} for name in reversed(self.LAYERS[image_id])]


def test_disk_use_counts_images_layers_and_runs_per_method(tmp_path):
    base_dir, cache = tmp_path / "base", tmp_path / "cache"
    method = base_dir / "methods" / "third"
    method.mkdir(parents=True)
    (method / "envmgr.toml").write_text('name = "third"\nentry = ["bash", "train.sh"]\n')
    (cache / "layers").mkdir(parents=True)
    (cache / "layers" / f"env-third-{'0' * 32}.tar").write_bytes(b"x" * 100)
    (cache / "layers" / f"method-third-{'1' * 32}.tar").write_bytes(b"x" * 10)
    (cache / "layers" / f"env-other-{'2' * 32}.tar").write_bytes(b"x" * 1000)
    run = base_dir / "runs" / "third" / "20261129-000000-abcd" / "output"
    run.mkdir(parents=True)
    (run / "lora.safetensors").write_bytes(b"w" * 42)
    (run / "again").hardlink_to(run / "lora.safetensors")     # one inode counts once
    config = load_config({"base_dir": str(base_dir), "cache_dir": str(cache)}, files=[], inherit_host=False)
    ctx = Context(config=config, ui=Reporter("plain"), _engine=FakeEngine())  # type: ignore[arg-type]
    [third] = usage(ctx, {"third"})
    # base shared with the other method; env, m1 and m2 its own, env counted once
    assert (third.images, third.image_bytes, third.unique_bytes, third.shared_bytes) == (2, 4_030, 1_030, 3_000)
    assert (third.layer_bytes, third.runs, third.runs_bytes) == (110, 1, 42)
    assert describe(third) == ("third: 2 images 0.0 MB (0.0 MB its own, 0.0 MB shared), cached layers 0.0 MB, "
                               "1 run 0.0 MB")
