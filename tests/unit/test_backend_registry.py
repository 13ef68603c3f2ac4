"""A new backend is one module and one registry entry: a test-only backend (tests/support/fake_backend.py)
is registered, detected by `envmgr method add`, and asked every question of the Backend protocol by the
parts of envmgr that ask them (lock, show, build's inputs and layers, the entry command, the SBOM)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from envmgr.core.config import load_config
from envmgr.core.errors import UsageError
from envmgr.core.ui import Reporter
from envmgr.door.context import Context
from envmgr.images.base import BaseImage
from envmgr.images.image import ImageConfig, Layer, tarinfo
from envmgr.lock import backends
from envmgr.lock.backends import Backend, entry_command, get_backend
from tests.support.fake_backend import PIN, PIN_SHA, PixiBackend

BASE = BaseImage(name="bookworm-py311", image_id="sha256:" + "b" * 64, diff_id="sha256:" + "d" * 64,
                 layer_path="/nonexistent", python="/usr/bin/python3.11", python_version="3.11.2", packages={})
QUESTIONS = sorted(name for name, value in vars(Backend).items() if callable(value) and not name.startswith("_"))


def _register(monkeypatch, fake: PixiBackend, first: bool = False) -> None:
    """The registry entry (first: preferred over every other kind when a repository has several files)."""
    known = backends.registry()
    monkeypatch.setattr(backends, "_REGISTRY", {"pixi": fake, **known} if first else {**known, "pixi": fake})


def _ctx(tmp_path: Path) -> Context:
    config = load_config({"cache_dir": str(tmp_path / "cache"), "base_dir": str(tmp_path / "base")}, files=[])
    return Context(config=config, ui=Reporter("plain"), step_runner=None)


def _repository(tmp_path: Path, **files: str) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    for name, text in {"pixi.toml": "[project]\nname = \"px\"\n", "train.py": "print(1)\n", **files}.items():
        (root / name.replace("__", ".")).write_text(text)
    return root


def test_every_kind_answers_every_question():
    for kind, backend in backends.registry().items():
        assert backend.name == kind and backend.env_file
        assert isinstance(backend.layered, bool)
        for question in QUESTIONS:
            assert callable(getattr(backend, question)), f"{kind} does not answer {question}"
    assert list(backends.registry()) == ["poetry", "conda", "pip"], "detection's order of preference"


def test_a_registered_backend_is_detected(monkeypatch, tmp_path):
    from envmgr.lock.methods import detect_backend

    fake = PixiBackend()
    _register(monkeypatch, fake)
    root = _repository(tmp_path)
    assert detect_backend(root, None).backend == "pixi"
    assert detect_backend(root, None).reason == "pixi.toml"
    (root / "requirements.txt").write_text("numpy\n")
    found = detect_backend(root, None)
    assert found.backend == "pip", "registered last: the least preferred"
    assert found.note == ("found requirements.txt, pixi.toml; using requirements.txt (pip) "
                          "(choose another with --backend)")
    assert detect_backend(root, "pixi").backend == "pixi"
    (root / "pixi.toml").unlink()
    with pytest.raises(UsageError, match=r"--backend pixi: the repository has no pixi.toml"):
        detect_backend(root, "pixi")
    (root / "requirements.txt").unlink()
    with pytest.raises(UsageError, match=r"no environment file found \(pyproject.toml, environment.yml, "
                                         r"requirements.txt or pixi.toml\)"):
        detect_backend(root, None)


def test_a_preferred_backend_may_refuse_to_win(monkeypatch, tmp_path):
    from envmgr.lock.methods import detect_backend

    fake = PixiBackend()
    _register(monkeypatch, fake, first=True)
    root = _repository(tmp_path, pixi__toml="strict = true\n", requirements__txt="numpy\n")
    with pytest.raises(UsageError, match="pixi.toml and requirements.txt disagree"):
        detect_backend(root, None)
    assert fake.asked.count("refuse_over") == 1
    assert detect_backend(root, "pip").backend == "pip", "--backend chooses without asking"


@pytest.mark.parametrize("layered", [True, False], ids=["layered", "one-layer"])
def test_a_registered_backend_is_asked_every_question(monkeypatch, tmp_path, layered):
    from envmgr.build import sbom, target
    from envmgr.lock.lock import lock
    from envmgr.lock.methods import add_method

    fake = PixiBackend(layered=layered)
    _register(monkeypatch, fake, first=True)
    ctx = _ctx(tmp_path)

    # `envmgr method add`: detected (preferred over the requirements.txt beside it), written as its kind
    repository = _repository(tmp_path, requirements__txt="numpy\n")
    spec, detected = add_method(ctx.config.base_dir, repository, "px", gpu="none")
    assert (detected.backend, spec.backend) == ("pixi", "pixi")
    assert detected.note == "found pixi.toml, requirements.txt; using pixi.toml (pixi) (choose another with --backend)"
    assert get_backend(spec) is fake

    # `envmgr lock`: written, checked, and what moved against the repository's own said
    monkeypatch.setattr("envmgr.lock.lock.ensure_base", lambda ctx, name: BASE)
    result = lock(ctx, "px")
    assert result.files == [spec.lock_path / "pixi.lock"]
    assert result.drift == [{"package": "numpy", "theirs": "1.26.0", "ours": "1.26.4"}]
    assert result.seeded_from == "pixi.lock.theirs"
    assert lock(ctx, "px", check=True).current

    # `envmgr show`: its check and summary
    from typer.testing import CliRunner

    from envmgr.face.cli import STATE, app

    monkeypatch.setenv("ENVMGR_CONFIG", "/dev/null")
    STATE.clear()
    shown = CliRunner().invoke(app, ["--base-dir", str(ctx.config.base_dir), "--cache-dir", str(ctx.cache_dir),
                                     "--json", "show", "px"])
    assert shown.exit_code == 0, shown.stdout + shown.stderr
    event = json.loads(next(line for line in shown.stdout.splitlines() if '"method"' in line))
    assert (event["backend"], event["lock"], event["packages"], event["pins"]) == \
        ("pixi", "current", 1, {"numpy": "1.26.4"})

    # build: the lock's files are inputs; the environment is layered per distribution, or one layer
    assert target.lock_hash(ctx, spec) != target.lock_hash(ctx, spec.model_copy(update={"lock_dir": "elsewhere"}))
    assert target.is_layered(spec) is layered
    data = {"layout": "test", "base": BASE.image_id, "lock": "l", "installer": "i"}
    handed: dict = {}
    monkeypatch.setattr(target, "build_env_layers", lambda ctx, name, base, entries, extra, *rest: handed.update(
        entries=entries, extra=extra) or "layers")
    made = target.env_layers(ctx, spec, BASE, data)
    if layered:
        assert made == "layers" and handed == {"entries": [f"{PIN} --hash=sha256:{PIN_SHA}"], "extra": []}
    else:
        assert handed == {} and made.labels == ["environment"]
        with tarfile.open(made.layers[0].path) as tar:
            assert f"{spec.env_prefix.lstrip('/')}/bin/pixi-env" in tar.getnames()

    # run: the entry starts through the backend's activation
    assert entry_command(spec, ["python", "train.py"]) == ["pixi", "run", "--", "python", "train.py"]

    # the SBOM: the file hashes the lock allows
    layers = [_layer(tmp_path / "base.tar", {}), _layer(tmp_path / "env.tar", {
        f"{spec.env_prefix.lstrip('/')}/lib/python3.11/site-packages/numpy-1.26.4.dist-info/METADATA":
            b"Metadata-Version: 2.1\nName: numpy\nVersion: 1.26.4\n"}), _layer(tmp_path / "method.tar", {})]
    document = json.loads(sbom.generate(spec, BASE, ImageConfig(layers=layers)))
    [numpy] = [c for c in document["components"] if c["name"] == "numpy"]
    assert {"name": "envmgr:lock-file-sha256", "value": PIN_SHA} in numpy["properties"]

    # a layered environment is installed unit by unit (build_env_layers), never through `install`
    assert sorted(set(fake.asked)) == [q for q in QUESTIONS if not (layered and q == "install")]


def _layer(path: Path, files: dict[str, bytes]) -> Layer:
    with tarfile.open(path, "w") as tar:
        for name, body in files.items():
            tar.addfile(tarinfo(name, tarfile.REGTYPE, 0o644, len(body)), io.BytesIO(body))
    return Layer(path, "sha256:" + path.name.encode().hex().ljust(64, "0")[:64], path.stat().st_size)
