"""Thin exports without an engine: what may be left out, how the list is checked, how a refusal reads."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from envmgr.core.errors import UsageError
from envmgr.images.image import ImageConfig, Layer, tarinfo
from envmgr.ship import thin
from envmgr.ship.manifest import MANIFEST, read_manifest
from envmgr.ship.trust import TrustError, statement_layers


def _id(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


BASE, ENV, TORCH, METHOD, OTHER = (_id(t) for t in ("base", "env", "torch", "method", "other"))


def _member(diff_id: str) -> dict:
    hex_ = diff_id.split(":")[1]
    return {"name": f"{hex_}/layer.tar", "part": "layer", "size": 1, "sha256": hex_}


def _thin_manifest(left: list[str], carried: list[str]) -> dict:
    return {"format": thin.THIN_FORMAT, "image_id": _id("image"),
            "left_out": [{"diff_id": d, "size": 5_000_000, "history": f"made {d[7:11]}"} for d in left],
            "thin_for": {"image_id": _id("target")},
            "members": [{"name": "manifest.json"}] + [_member(d) for d in carried]}


def test_the_common_layer_chain_is_left_out_but_never_the_method_layer():
    assert thin.shared_prefix([BASE, ENV, METHOD], [BASE, ENV, OTHER]) == 2
    assert thin.shared_prefix([BASE, ENV, METHOD], [BASE, ENV, METHOD]) == 2, "the method layer always travels"
    assert thin.shared_prefix([BASE, ENV, TORCH, METHOD], [BASE]) == 1
    # the engine keeps layers by chain: torch above another environment layer is not reusable
    assert thin.shared_prefix([BASE, ENV, TORCH, METHOD], [BASE, OTHER, TORCH]) == 1
    assert thin.shared_prefix([BASE, ENV, METHOD], [OTHER, ENV, METHOD]) == 0


def test_left_out_entries_name_each_layer_with_its_history(tmp_path):
    layers = [Layer(tmp_path / "a", BASE, 10), Layer(tmp_path / "b", ENV, 20), Layer(tmp_path / "c", METHOD, 3)]
    config = ImageConfig(layers=layers, history=["envmgr base x", "envmgr environment m", "envmgr method files m"])
    assert thin.left_out_entries(config, 2) == [{"diff_id": BASE, "size": 10, "history": "envmgr base x"},
                                                {"diff_id": ENV, "size": 20, "history": "envmgr environment m"}]


def test_an_archive_lists_its_layers_left_out_first():
    assert thin.archive_layers(_thin_manifest([BASE, ENV], [METHOD])) == [BASE, ENV, METHOD]
    full = {"format": "envmgr-export/2", "members": [_member(BASE), _member(ENV), {"name": "x.json"}]}
    assert thin.archive_layers(full) == [BASE, ENV]


def test_thin_for_an_archive_reads_only_its_header(tmp_path):
    manifest = _thin_manifest([BASE], [ENV, METHOD])
    body = json.dumps(manifest).encode()
    archive = tmp_path / "old.envmgr.tar"
    with tarfile.open(archive, "w") as tar:
        tar.addfile(tarinfo(MANIFEST, tarfile.REGTYPE, 0o644, len(body)), io.BytesIO(body))
        # no layer members at all: a header is all --thin-for needs
    assert read_manifest(archive)["format"] == thin.THIN_FORMAT

    class Ctx:
        engine = None

    assert thin.target_layers(Ctx(), str(archive)) == (manifest["image_id"], [BASE, ENV, METHOD])  # type: ignore[arg-type]


def test_thin_for_an_unknown_target_is_bad_input(tmp_path):
    class Engine:
        def inspect_image(self, ref):
            return None

    class Ctx:
        engine = Engine()

    with pytest.raises(UsageError, match="neither an export archive file nor an image"):
        thin.target_layers(Ctx(), str(tmp_path / "nope"))  # type: ignore[arg-type]


@pytest.mark.parametrize(("change", "message"), [
    (lambda m: m.update(format="envmgr-export/2"), "a full archive with a left_out list"),
    (lambda m: m.update(left_out=[]), "without the list of layers it left out"),
    (lambda m: m.pop("left_out"), "without the list of layers it left out"),
    (lambda m: m["left_out"].append({"diff_id": "sha256:xyz"}), "malformed"),
    (lambda m: m["left_out"].append(dict(m["left_out"][0])), "malformed"),
    (lambda m: m["left_out"].append({"diff_id": METHOD}), "both carried and left out"),
])
def test_a_malformed_left_out_list_is_refused(change, message):
    manifest = _thin_manifest([BASE, ENV], [METHOD])
    thin.check_listing(Path("a.tar"), manifest)   # as written: fine
    change(manifest)
    with pytest.raises(TrustError, match=message):
        thin.check_listing(Path("a.tar"), manifest)


def test_a_full_archive_needs_no_list():
    thin.check_listing(Path("a.tar"), {"format": "envmgr-export/2", "members": []})


def test_the_left_out_and_carried_layers_must_make_the_whole_image():
    config = {"rootfs": {"diff_ids": [BASE, ENV, METHOD]}}
    thin.check_config(Path("a.tar"), _thin_manifest([BASE, ENV], [METHOD]), config)
    with pytest.raises(TrustError, match="not the image's first 2 layers"):
        thin.check_config(Path("a.tar"), _thin_manifest([ENV, BASE], [METHOD]), config)
    with pytest.raises(TrustError, match=f"layer {ENV[7:19]} is neither in the archive"):
        thin.check_config(Path("a.tar"), _thin_manifest([BASE], [METHOD]), config)
    with pytest.raises(TrustError, match=f"layer {METHOD[7:19]} is neither"):
        thin.check_config(Path("a.tar"), {"format": "envmgr-export/2", "members": [_member(BASE), _member(ENV)]},
                          config)


class _Engine:
    def __init__(self, chain: list[str]):
        self.chain = chain
        self.asked: list[list[str]] = []

    def present_layers(self, diff_ids: list[str]) -> frozenset[str]:
        self.asked.append(diff_ids)
        common = 0
        while common < min(len(diff_ids), len(self.chain)) and diff_ids[common] == self.chain[common]:
            common += 1
        return frozenset(diff_ids[:common])


def test_missing_left_out_layers_are_named_with_what_made_them():
    class Ctx:
        engine = _Engine([BASE])

    manifest = _thin_manifest([BASE, ENV, TORCH], [METHOD])
    missing = thin.missing_layers(Ctx(), manifest)  # type: ignore[arg-type]
    assert [e["diff_id"] for e in missing] == [ENV, TORCH]
    message = thin.refusal(Path("m.tar"), manifest, missing)
    assert f"{ENV[7:19]} (made {ENV[7:11]}, 5.0 MB)" in message and TORCH[7:19] in message
    assert BASE[7:19] not in message and _id("target")[:19] in message and "nothing was loaded" in message

    class Complete:
        engine = _Engine([BASE, ENV, TORCH, OTHER])

    assert thin.missing_layers(Complete(), manifest) == []  # type: ignore[arg-type]


def test_a_signed_thin_statement_covers_the_left_out_layers():
    statement = json.dumps(_thin_manifest([BASE, ENV], [METHOD])).encode()
    image_id, layers = statement_layers("export", statement)
    assert image_id == _id("image") and layers == sorted([BASE, ENV, METHOD])
