"""The engine as the source of truth for layers, and SBOMs from records (issue 26): a real engine, the
loopback index and pip methods of test_layers.py.

A method image's `org.envmgr.layer-facts` label records what each environment layer holds; a cache that
has never seen a layer learns it from there (and copies layers the engine holds only on another chain out
of an image), and `envmgr sbom` reads it instead of the layers.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.test_layers import REPO, SMALL, Methods, _layers, layer_index  # noqa: F401 - a fixture
from tests.support.engine_proxy import EngineProxy
from tests.support.pypi import Index, build_wheel

# lfx-juliet and lfx-oscar share bucket 14 (layers.bucket_of), lfx-papa and lfx-tango bucket 23 above it,
# lfx-mike bucket 2 below it
BUCKETED = ["lfx-oscar", "lfx-papa", "lfx-tango", "lfx-mike"]


@pytest.fixture(scope="module")
def bucket_index(tmp_path_factory):
    root = tmp_path_factory.mktemp("bucket-wheels")
    for name in BUCKETED:
        build_wheel(root, name, "1.0", extra={f"{name.replace('-', '_')}/data.py": f"NAME = {name!r}\n" * 50})
    for version in ("1.0", "1.1"):
        build_wheel(root, "lfx-juliet", version, body=f'NAME = "lfx-juliet-{version}"\n')
    index = Index(root).start()
    yield index
    index.stop()


@pytest.fixture
def methods(tmp_path, store, engine, layer_index):  # noqa: F811 - the fixture imported above
    ws = Methods(tmp_path, store, layer_index.url)
    yield ws
    ws.cleanup(engine)


def _events(proc: subprocess.CompletedProcess) -> list[dict]:
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def _build(methods: Methods, name: str, cache: Path, *extra: str) -> tuple[dict, dict]:
    """(the done event, the environment step's event: which distributions were installed, which learned)."""
    events = _events(methods.envmgr("-v", "--json", "build", name, *extra, cache=cache))
    done = [e for e in events if e.get("event") == "done"][-1]
    env = [e for e in events if e.get("event") == "step" and "installed" in e]   # a pass per look at the layers
    said = [e.get("message") or e.get("line") for e in events if "cop" in (e.get("message") or e.get("line") or "")]
    return done, {"installed": sorted({n for e in env for n in e["installed"]}),
                  "learned": sorted({n for e in env for n in e["learned"]}), "passes": len(env), "said": said}


def test_a_new_cache_reuses_the_engines_layers_and_installs_only_the_changed_distribution(methods, engine,
                                                                                         tmp_path):
    reqs = [*SMALL[1:], "lyr-apple==1.0", "lyr-bigtorch", "lyr-ns-one", "lyr-ns-two"]
    name = methods.add(reqs)
    methods.envmgr("lock", name)
    _first, first_env = _build(methods, name, methods.cache_dir)
    assert "lyr-apple" in first_env["installed"] and first_env["learned"] == []

    # one pin changed, built with a cache that never saw any of it (a second base dir, a new cache)
    methods.requirements(name, [r.replace("lyr-apple==1.0", "lyr-apple==1.1") for r in reqs])
    methods.envmgr("lock", name)
    second, second_env = _build(methods, name, tmp_path / "new-cache")
    assert second_env["installed"] == ["lyr-apple"], second_env
    assert "lyr-bigtorch" in second_env["learned"] and "lyr-apple" not in second_env["learned"]
    out = engine.containers.run(second["tag"], ["python", "-c", "import lyr_apple, lyr_bigtorch, lyr_shared.one; "
                                                "print(lyr_apple.NAME, lyr_bigtorch.VERSION)"],
                                remove=True, network_mode="none")
    assert out.decode().split() == ["lyr-apple-1.1", "2.0"]

    # the same image as the first cache makes by installing the new pin itself (nothing depends on the cache)
    engine.images.remove(second["image"], force=True)
    third, third_env = _build(methods, name, methods.cache_dir)
    assert third_env["installed"] == ["lyr-apple"] and third_env["learned"] == []
    assert third["image"] == second["image"]


def test_layers_the_engine_holds_only_on_another_chain_are_copied_out_not_installed(methods, engine, tmp_path):
    """A new large layer goes below layers the engine holds (above another torch): a new cache copies their
    files out of the engine's image and checks they make the recorded bytes, instead of installing them."""
    one = methods.add(["lyr-bigtorch", "lyr-apple==1.0", "lyr-berry", "lyr-cherry"])
    methods.envmgr("lock", one)
    _build(methods, one, methods.cache_dir)
    two = methods.add(["lyr-bighuge", "lyr-bigtorch", "lyr-apple==1.0", "lyr-berry", "lyr-cherry"])
    methods.envmgr("lock", two)
    done, env = _build(methods, two, tmp_path / "new-cache")
    assert env["installed"] == ["lyr-bighuge"], env
    engine.images.remove(done["image"], force=True)
    reference, reference_env = _build(methods, two, methods.cache_dir)
    assert reference_env["learned"] == [] and "lyr-bighuge" in reference_env["installed"]
    assert reference["image"] == done["image"]


def test_a_changed_pin_sharing_its_layer_takes_the_others_files_from_the_engine(tmp_path, store, engine,
                                                                               bucket_index):
    """juliet's bucket changes: oscar, in the same bucket, is copied out of the engine's image (checked by
    the old bucket's diff ID), and so are the buckets above it (another chain now): juliet alone installs."""
    from envmgr.build.layers import bucket_of

    assert bucket_of("lfx-juliet") == bucket_of("lfx-oscar") == 14 and bucket_of("lfx-papa") == 23
    methods = Methods(tmp_path, store, bucket_index.url)
    try:
        reqs = ["lfx-juliet==1.0", *BUCKETED]
        name = methods.add(reqs)
        methods.envmgr("lock", name)
        _build(methods, name, methods.cache_dir)
        methods.requirements(name, ["lfx-juliet==1.1", *BUCKETED])
        methods.envmgr("lock", name)
        done, env = _build(methods, name, tmp_path / "new-cache")
        assert env["installed"] == ["lfx-juliet"], env
        out = engine.containers.run(done["tag"], ["python", "-c", "import lfx_juliet, lfx_oscar.data, lfx_tango; "
                                                  "print(lfx_juliet.NAME, lfx_oscar.data.NAME)"],
                                    remove=True, network_mode="none")
        assert out.decode().split() == ["lfx-juliet-1.1", "lfx-oscar"]
        engine.images.remove(done["image"], force=True)
        reference, _ = _build(methods, name, methods.cache_dir)   # installs oscar again from its uv cache
        assert reference["image"] == done["image"]
    finally:
        methods.cleanup(engine)


class RecordingProxy(EngineProxy):
    """An engine relay that notes every request line a client sends (method and path)."""

    def __init__(self, path: Path):
        super().__init__(path)
        self.requests: list[str] = []

    def _pipe(self, source, sink) -> None:  # type: ignore[override]
        try:
            while data := source.recv(65536):
                if source in self._open[::2]:   # client -> engine
                    self.requests += [m.decode() for m in re.findall(rb"(?:GET|POST|DELETE|HEAD|PUT) \S+", data)]
                sink.sendall(data)
            sink.shutdown(1)
        except OSError:
            pass


def test_sbom_with_an_empty_cache_reads_no_layer_bytes_and_matches_the_sbom_from_bytes(methods, engine, tmp_path,
                                                                                     monkeypatch):
    name = methods.add(["lyr-bigtorch", "lyr-apple==1.0", "lyr-ns-one", "lyr-ns-two", "lyr-fig"])
    methods.envmgr("lock", name)
    built, _ = _build(methods, name, methods.cache_dir)

    proxy = RecordingProxy(tmp_path / "engine.sock").start()
    try:
        env = {**methods.env(tmp_path / "empty-cache"), "DOCKER_HOST": proxy.url}
        proc = subprocess.run([sys.executable, "-m", "envmgr", "sbom", name], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=600)
    finally:
        proxy.stop()
    assert proc.returncode == 0, proc.stderr
    assert proxy.requests, "the proxy saw the envmgr's requests"
    assert not [r for r in proxy.requests if re.search(r"/images/[^ ]+/get|/containers/create", r)], proxy.requests
    assert "back from the engine" not in proc.stderr
    from_records = proc.stdout.encode()

    # the same document made from the layers' bytes (read back from the engine into another empty cache)
    from envmgr.build import sbom
    from envmgr.build.build import target
    from envmgr.core.config import load_config
    from envmgr.door.context import Context
    from envmgr.build.layer_bytes import engine_config
    from envmgr.core.spec import find_method
    from envmgr.core.ui import Reporter

    for key, value in methods.env(tmp_path / "bytes-cache").items():
        if key.startswith("ENVMGR_"):
            monkeypatch.setenv(key, value)
    ctx = Context(config=load_config({}), ui=Reporter("plain"))
    spec = find_method(name, ctx.config.base_dir)
    wanted = target(ctx, spec)
    config = engine_config(ctx, built["image"], {wanted.base.diff_id: Path(wanted.base.layer_path)})
    assert config is not None
    from_bytes = sbom.generate(spec, wanted.base, config, ctx, from_bytes=True)
    assert list((tmp_path / "bytes-cache" / "sbom" / "layers").iterdir()), "the layers' bytes were read"
    assert from_bytes == from_records.removesuffix(b"\n")   # `sbom` ends the document with a newline
    document = json.loads(from_records)
    names = {c["name"] for c in document["components"]}
    assert {"lyr-bigtorch", "lyr-apple", "lyr-ns-one", "lyr-fig"} <= names
    assert any(c["purl"].startswith("pkg:deb/debian/") for c in document["components"])
    assert _layers(engine, built["image"])[1:-1] == [layer.diff_id for layer in config.layers[1:-1]]
