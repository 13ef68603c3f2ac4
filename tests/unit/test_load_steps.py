"""Loading in steps (envmgr/build/load_steps.py): the chain-prefix images and their archives, and the order in
which a stepped load lets the engine register them (a step's manifest only after the step below answered)."""

import io
import json
import tarfile
import threading

import pytest

from envmgr.build.load_steps import load_in_steps, step_archives, steps
from envmgr.core import paths
from envmgr.core.errors import EngineError
from envmgr.images.image import ImageConfig, archive_pieces, pieces_size, write_layer, write_pieces


def _config(tmp_path, sizes, env=None):
    layers = []
    for index, size in enumerate(sizes):
        tree = tmp_path / f"tree{index}"
        tree.mkdir()
        (tree / "f.bin").write_bytes(bytes([index]) * size)
        layers.append(write_layer(tmp_path / f"{index}.tar", trees=[(tree, f"/opt/l{index}")]))
    return ImageConfig(layers=layers, env=env or {"A": "1"}, cmd=["run"], labels={paths.LABEL_MANAGED: "true",
                       paths.LABEL_METHOD: "m"}, history=[f"layer {i}" for i in range(len(layers))])


def _members(pieces):
    out = io.BytesIO()
    write_pieces(out, pieces)
    out.seek(0)
    with tarfile.open(fileobj=out) as tar:
        names = tar.getnames()
        manifest = json.loads(tar.extractfile("manifest.json").read())
    return names, manifest


def test_steps_are_chain_prefixes_ending_with_the_image_itself(tmp_path):
    config = _config(tmp_path, [30_000, 5_000, 30_000, 2_000, 2_000])
    made = steps(config, frozenset(), step_bytes=20_000)
    assert [len(step.layers) for step in made] == [1, 3, 5]
    assert made[-1] is config
    for step in made[:-1]:
        assert step.layers == config.layers[:len(step.layers)]
        assert step.history == config.history[:len(step.layers)]
        assert step.labels == {paths.LABEL_MANAGED: "true", paths.LABEL_PARTIAL: config.image_id()}
        assert paths.LABEL_METHOD not in step.labels   # never mistaken for a method image (gc, list)
        assert step.image_id() != config.image_id()


def test_layers_the_engine_holds_start_no_step(tmp_path):
    config = _config(tmp_path, [30_000, 30_000, 30_000])
    held = frozenset(layer.diff_id for layer in config.layers[:2])
    assert steps(config, held, step_bytes=20_000) == [config]
    assert [len(s.layers) for s in steps(config, frozenset(), step_bytes=20_000)] == [1, 2, 3]
    assert steps(config, frozenset(), step_bytes=10**9) == [config]


def test_each_layer_goes_in_exactly_one_step_archive_that_ends_with_its_manifest(tmp_path):
    config = _config(tmp_path, [30_000, 5_000, 30_000, 2_000, 2_000])
    present = frozenset({config.layers[0].diff_id})
    archives = step_archives(config, present, step_bytes=20_000)
    sent = []
    for step, pieces in archives:
        names, manifest = _members(pieces)
        assert names[-1] == "manifest.json"
        assert isinstance(pieces[-1], bytes) and b"manifest.json" in pieces[-1]
        config_hex = step.image_id().split(":", 1)[1]
        assert manifest == [{"Config": f"{config_hex}.json", "RepoTags": [],
                             "Layers": [f"{layer.diff_id.split(':', 1)[1]}/layer.tar" for layer in step.layers]}]
        sent += [name.split("/")[0] for name in names if name.endswith("/layer.tar")]
    assert sorted(sent) == sorted(layer.diff_id.split(":", 1)[1] for layer in config.layers[1:])
    # the last step is the image's own archive less the layers the steps below brought
    final, pieces = archives[-1]
    below = frozenset(layer.diff_id for layer in config.layers[:len(archives[-2][0].layers)])
    assert final is config and pieces == archive_pieces(config, [], below)


def test_a_layer_found_again_higher_up_is_sent_again(tmp_path):
    config = _config(tmp_path, [30_000, 30_000])
    config = ImageConfig(layers=[*config.layers, config.layers[0]], history=["a", "b", "c"])
    archives = step_archives(config, frozenset(), step_bytes=20_000)
    counts = [sum(name.endswith("layer.tar") for name in _members(pieces)[0]) for _, pieces in archives]
    assert counts == [1, 1, 1]   # a new chain: the engine needs the bytes again


class _Engine:
    """Records when each archive's body and end reach it; answers a load as the engine does, after the end."""

    def __init__(self, fail_at=None):
        self.events = []
        self.removed = []
        self.fail_at = fail_at
        self.lock = threading.Lock()
        self.partials = []

    def load_files(self, pieces, length, progress=None):
        pieces = list_with_events(pieces, self)
        assert pieces_size(pieces) == length
        names, manifest = _members(pieces)
        config_name = manifest[0]["Config"]
        with self.lock:
            self.events.append(("registered", config_name))
            if self.fail_at == config_name:
                raise EngineError("engine refused the image archive: layer not found")
        return [config_name]

    def images(self, label=None, all_=False):
        return [{"Id": i, "Labels": {paths.LABEL_PARTIAL: p}} for i, p in self.partials]

    def remove_image(self, ref):
        self.removed.append(ref)


def list_with_events(pieces, engine):
    got = []
    for piece in pieces:
        if isinstance(piece, bytes) and b"manifest.json" in piece:
            with engine.lock:
                engine.events.append(("end", len(engine.events)))
        got.append(piece)
    return got


def test_a_step_ends_its_archive_only_after_the_step_below_was_registered(tmp_path):
    config = _config(tmp_path, [30_000, 30_000, 30_000, 30_000])
    engine = _Engine()
    engine.partials = [("sha256:old", "sha256:other-image")] + [
        (s.image_id(), config.image_id()) for s in steps(config, frozenset(), step_bytes=20_000)[:-1]]
    assert load_in_steps(engine, config, frozenset(), step_bytes=20_000) == config.image_id()
    kinds = [kind for kind, _ in engine.events]
    assert kinds == ["end", "registered"] * 4   # never two ends before a registration
    registered = [name for kind, name in engine.events if kind == "registered"]
    assert registered == [f"{s.image_id().split(':')[1]}.json" for s in steps(config, frozenset(), 20_000)]
    assert engine.removed == [s.image_id() for s in steps(config, frozenset(), 20_000)[:-1]]   # not another's


def test_a_failed_step_stops_the_steps_above_and_raises(tmp_path):
    config = _config(tmp_path, [30_000, 30_000, 30_000, 30_000])
    second = steps(config, frozenset(), step_bytes=20_000)[1]
    engine = _Engine(fail_at=f"{second.image_id().split(':')[1]}.json")
    with pytest.raises(EngineError, match="layer not found"):
        load_in_steps(engine, config, frozenset(), step_bytes=20_000)
    registered = [name for kind, name in engine.events if kind == "registered"]
    assert len(registered) == 2            # the third step's archive was cut short: never registered
    assert engine.removed == []            # the partial images stay for the next build or gc


def test_the_archive_end_is_held_back_while_the_step_below_registers(tmp_path):
    """The body of step 2 is sent while step 1 is still loading; its end only once step 1 answered."""
    config = _config(tmp_path, [30_000, 30_000])
    first_answering = threading.Event()
    body_of_second = threading.Event()
    order = []

    class Engine:
        def load_files(self, pieces, length, progress=None):
            pieces = iter(pieces)
            next(pieces)
            if not first_answering.is_set():   # step 1: wait (registering) until step 2's body arrived
                first_answering.set()
                list(pieces)
                assert body_of_second.wait(10)
                order.append("step 1 answered")
                return []
            for piece in pieces:
                if isinstance(piece, bytes) and b"manifest.json" in piece:
                    order.append("step 2 end")
                elif not isinstance(piece, bytes):
                    body_of_second.set()
            return []

        def images(self, label=None, all_=False):
            return []

    load_in_steps(Engine(), config, frozenset(), step_bytes=20_000)
    assert order == ["step 1 answered", "step 2 end"]


def test_the_environment_sets_the_step_size_and_0_turns_steps_off(tmp_path, monkeypatch):
    from envmgr.build.load_steps import STEP_BYTES
    from envmgr.core.errors import UsageError

    config = _config(tmp_path, [30_000, 30_000])
    monkeypatch.delenv(paths.ENV_LOAD_STEP_BYTES, raising=False)
    assert steps(config, frozenset()) == [config] and STEP_BYTES > 30_000   # small images: one archive
    monkeypatch.setenv(paths.ENV_LOAD_STEP_BYTES, "0")
    assert steps(config, frozenset()) == [config]
    monkeypatch.setenv(paths.ENV_LOAD_STEP_BYTES, "20000")
    assert [len(s.layers) for s in steps(config, frozenset())] == [1, 2]
    monkeypatch.setenv(paths.ENV_LOAD_STEP_BYTES, "256M")
    with pytest.raises(UsageError, match="whole number of bytes"):
        steps(config, frozenset())
