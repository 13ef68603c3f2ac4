"""A new cache takes its base image from the engine (issue 26: the engine as the source of truth), not from
debootstrap: only an image that is exactly envmgr's base for today's definition, its layer checked."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from envmgr.core.config import load_config
from envmgr.core.errors import EngineError
from envmgr.core.ui import Reporter
from envmgr.door.context import Context
from envmgr.images import base as base_module
from envmgr.images.image import ImageConfig, file_layer, write_archive

NAME = "bookworm-py311"
STATUS = ("Package: python3.11-minimal\nStatus: install ok installed\nVersion: 3.11.2-6+deb12u6\n\n"
          "Package: libc6\nStatus: install ok installed\nVersion: 2.36-9+deb12u10\n")


def rootfs_tar(path: Path, status: str = STATUS) -> Path:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in (("var/lib/dpkg/status", status.encode()), ("usr/bin/python3.11", b"\x7fELF")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


class FakeEngine:
    def __init__(self, images: dict[str, tuple[ImageConfig, list[str]]], fail: bool = False):
        self.saved: list[str] = []
        self.archives = {}
        self.summaries = []
        self.fail = fail
        for tags, (config, repo_tags) in images.items():
            out = io.BytesIO()
            image_id = write_archive(out, config, repo_tags)
            self.archives[image_id] = out.getvalue()
            self.summaries.append({"Id": image_id, "RepoTags": repo_tags, "label": tags})

    def images(self, label=None, all_=False):
        if self.fail:
            raise EngineError("engine refused to list images: boom")
        return [s for s in self.summaries if label == f"org.envmgr.base={NAME}" and s["label"] == "base"]

    def save_image(self, ref):
        self.saved.append(ref)
        data = self.archives[ref]
        for at in range(0, len(data), 4096):   # in chunks, as the SDK streams it
            yield data[at:at + 4096]

    def image_id(self, ref):
        return next((s["Id"] for s in self.summaries if ref in s["RepoTags"] or ref == s["Id"]), None)


def context(tmp_path: Path, engine) -> Context:
    config = load_config({"cache_dir": str(tmp_path / "cache")}, files=[])
    ctx = Context(config=config, ui=Reporter("plain"))
    ctx._engine = engine
    return ctx


def base_config(layer_path: Path) -> ImageConfig:
    return base_module._config(base_module.load_definition(NAME), file_layer(layer_path))


def no_debootstrap(monkeypatch) -> None:
    def refuse(*_args):
        raise AssertionError("debootstrap ran although the engine holds the base")
    monkeypatch.setattr(base_module, "build_base", refuse)


def test_a_new_cache_takes_the_engines_base_without_debootstrap(tmp_path, monkeypatch):
    config = base_config(rootfs_tar(tmp_path / "rootfs.tar"))
    tag = f"envmgr/base-{NAME}:{config.layers[0].diff_id.split(':')[1][:16]}"
    engine = FakeEngine({"base": (config, [tag, f"envmgr/base-{NAME}:latest"])})
    ctx = context(tmp_path, engine)
    no_debootstrap(monkeypatch)

    base = base_module.ensure_base(ctx, NAME)

    assert base.image_id == config.image_id() and base.diff_id == config.layers[0].diff_id
    assert base.python_version == "3.11.2"
    assert base.packages == {"python3.11-minimal": "3.11.2-6+deb12u6", "libc6": "2.36-9+deb12u10"}
    assert Path(base.layer_path).read_bytes() == (tmp_path / "rootfs.tar").read_bytes()
    assert base.tag == tag
    # recorded as current: the next call reads it, saving nothing again
    assert json.loads(base_module._state_file(ctx, NAME).read_text())["image_id"] == base.image_id
    assert base_module.ensure_base(ctx, NAME).image_id == base.image_id
    assert engine.saved == [base.image_id]
    assert not list(Path(base.layer_path).parent.glob("*.partial"))


def test_an_image_that_is_not_this_definitions_base_is_not_taken(tmp_path):
    layer = file_layer(rootfs_tar(tmp_path / "rootfs.tar"))
    other = base_module._config(base_module.load_definition(NAME), layer)
    other.history = ["something else built this"]          # same layer, another image: not envmgr's base
    engine = FakeEngine({"base": (other, [f"envmgr/base-{NAME}:latest"])})
    ctx = context(tmp_path, engine)

    assert base_module.adopt_from_engine(ctx, NAME) is None
    assert base_module.current_base(ctx, NAME) is None
    assert not [p for p in (ctx.store_dir / "base" / NAME).iterdir() if p.suffix in (".tar", ".partial")]


def test_an_image_of_two_layers_is_not_taken(tmp_path):
    first = file_layer(rootfs_tar(tmp_path / "one.tar"))
    second = file_layer(rootfs_tar(tmp_path / "two.tar", STATUS.replace("2.36", "2.37")))
    config = base_module._config(base_module.load_definition(NAME), first)
    config.layers = [first, second]
    ctx = context(tmp_path, FakeEngine({"base": (config, [])}))

    assert base_module.adopt_from_engine(ctx, NAME) is None


def test_an_engine_that_cannot_list_images_means_building_as_before(tmp_path, monkeypatch):
    ctx = context(tmp_path, FakeEngine({}, fail=True))
    built = []
    monkeypatch.setattr(base_module, "build_base", lambda _ctx, name: built.append(name) or "built")

    assert base_module.ensure_base(ctx, NAME) == "built"
    assert built == [NAME]


@pytest.mark.parametrize("text, expected", [
    ("Package: python3.11\nVersion: 3.11.9-1\n", "3.11.9"),
    ("Package: libc6\nVersion: 2.36\n", ""),
])
def test_python_version_comes_from_the_interpreter_package(text, expected):
    packages = base_module._dpkg_status_versions(text)
    assert base_module._python_version(base_module.load_definition(NAME), packages) == expected
