"""Moving a method between servers: export/import, push/pull through a real registry, verify, gc.

One source server builds a copy of the `tiny` fixture method named `tiny-transfer` (its own image
name, so that tests running beside these on the same engine are never touched); a "second server"
is a fresh base dir, cache and store on the same engine, after the method's images were removed.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.integration.conftest import TINY_MAIN, TINY_PYPROJECT, TINY_SPEC, Workspace
from tests.support.said import error_lines

pytestmark = pytest.mark.engine

NAME = "tiny-transfer"
REPO = f"envmgr/{NAME}"
SECRET = "Registry-s3cret-Pass"


def _events(proc) -> list[dict]:
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def _done(proc) -> dict:
    return [e for e in _events(proc) if e.get("event") == "done"][-1]


def _remove_images(engine) -> None:
    for image in engine.images.list(REPO):
        engine.images.remove(image.id, force=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _new_server(root: Path, store: Path | None = None) -> Workspace:
    ws = Workspace(root / "base", root / "cache", store or root / "store")
    ws.method_dir = root / "base" / "methods" / NAME
    return ws


@pytest.fixture(scope="module")
def source(tmp_path_factory, store, engine, mirror_a):
    """A server with `tiny-transfer` locked and built."""
    root = tmp_path_factory.mktemp("source")
    ws = _new_server(root, store)
    ws.method_dir.mkdir(parents=True)
    (ws.method_dir / "envmgr.toml").write_text(TINY_SPEC.replace('name = "tiny"', f'name = "{NAME}"'))
    (ws.method_dir / "pyproject.toml").write_text(TINY_PYPROJECT)
    (ws.method_dir / "main.py").write_text(TINY_MAIN)
    ws.mirror = mirror_a.url
    ws.envmgr("lock", NAME, mirror=mirror_a.url)
    ws.built = _done(ws.envmgr("--json", "build", NAME, mirror=mirror_a.url))
    yield ws
    _remove_images(engine)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def archive(source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("archive") / f"{NAME}.envmgr.tar"
    source.envmgr("export", NAME, "-o", str(out))
    return out


def _registry_config(root: Path, port: int, readonly: bool = False) -> Path:
    (root / "data").mkdir(parents=True, exist_ok=True)
    text = (f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n"
            f"  delete:\n    enabled: true\n")
    if readonly:
        text += "  maintenance:\n    readonly:\n      enabled: true\n"
    text += f"http:\n  addr: 127.0.0.1:{port}\n"
    config = root / "config.yml"
    config.write_text(text)
    return config


def _start_registry(root: Path, readonly: bool = False):
    port = _free_port()
    proc = subprocess.Popen(["/usr/bin/docker-registry", "serve", str(_registry_config(root, port, readonly))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1)
            return proc, f"127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    pytest.fail("docker-registry did not answer within 20 s")


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A real registry (Debian's docker-registry) on 127.0.0.1: the engine treats loopback as insecure."""
    proc, address = _start_registry(tmp_path_factory.mktemp("registry"))
    yield address
    proc.terminate()
    proc.wait(timeout=10)


# ----------------------------------------------------------------------------- export


def test_export_twice_gives_identical_bytes_with_a_hash_for_every_member(source, archive, tmp_path):
    again = tmp_path / "again.tar"
    source.envmgr("export", NAME, "-o", str(again))
    assert hashlib.sha256(archive.read_bytes()).digest() == hashlib.sha256(again.read_bytes()).digest()
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        assert members[0].name == "envmgr/export.json"
        manifest = json.loads(tar.extractfile(members[0]).read())
        assert manifest["image_id"] == source.built["image"] and manifest["tag"] == source.built["tag"]
        listed = {m["name"]: m for m in manifest["members"]}
        for member in members[1:]:
            if member.isfile():
                data = tar.extractfile(member).read()
                assert hashlib.sha256(data).hexdigest() == listed.pop(member.name)["sha256"], member.name
        assert not listed
        assert {m.mtime for m in members} == {946684800} and {m.uid for m in members} == {0}
        names = tar.getnames()
    assert {"envmgr/method/envmgr.toml", "envmgr/method/poetry.lock", "envmgr/sbom.cdx.json",
            "manifest.json"} <= set(names)
    assert "envmgr/method/main.py" not in names, "a method file is stored once: in the method layer"
    assert not list(tmp_path.glob(".*partial"))


def test_export_to_a_full_disk_leaves_no_file_under_the_final_name(source, tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(full)], check=True)
    try:
        proc = source.envmgr("export", NAME, "--compress", "gzip", "-o", str(full / "out.tar.gz"), check=False)
        assert proc.returncode == 1 and "disk full" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
        assert list(full.iterdir()) == []
        plain = source.envmgr("export", NAME, "-o", str(full / "out.tar"), check=False)
        assert plain.returncode == 1 and "not enough space" in plain.stderr
        assert list(full.iterdir()) == []
    finally:
        subprocess.run(["umount", str(full)], check=True)


# ----------------------------------------------------------------------------- import


def _rewrite_for_arm64(archive: Path, out: Path) -> None:
    """The same archive, consistently re-hashed, with an image config for arm64."""
    with tarfile.open(archive) as tar:
        items = [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]
    manifest = json.loads(items[0][1])
    old_config = manifest["image_id"].split(":")[1] + ".json"
    data = dict((m.name, d) for m, d in items)
    config = json.loads(data[old_config])
    config["architecture"] = "arm64"
    config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    config_hex = hashlib.sha256(config_bytes).hexdigest()
    docker_manifest = json.loads(data["manifest.json"])
    docker_manifest[0]["Config"] = f"{config_hex}.json"
    manifest_bytes = json.dumps(docker_manifest).encode()
    replaced = {old_config: (f"{config_hex}.json", config_bytes), "manifest.json": ("manifest.json", manifest_bytes)}
    manifest.update(architecture="arm64", image_id=f"sha256:{config_hex}")
    for entry in manifest["members"]:
        if entry["name"] in replaced:
            name, body = replaced[entry["name"]]
            entry.update(name=name, size=len(body), sha256=hashlib.sha256(body).hexdigest())
    with tarfile.open(out, "w") as tar:
        for member, body in items:
            if member.name == "envmgr/export.json":
                body = json.dumps(manifest).encode()
            elif member.name in replaced:
                member.name, body = replaced[member.name]
            member.size = len(body) if body is not None else 0
            tar.addfile(member, io.BytesIO(body) if body is not None else None)


def _assert_nothing_loaded(target: Workspace, engine) -> None:
    assert not engine.images.list(REPO)
    assert not (target.base_dir / "methods" / NAME).exists()
    assert not list((target.base_dir / "methods").glob(".import-*")) if (target.base_dir / "methods").exists() else True
    assert not (target.store / "base" / "bookworm-py311" / "current.json").exists()


def test_damaged_or_foreign_archives_load_nothing_and_name_the_part(source, archive, tmp_path, engine):
    _remove_images(engine)
    target = _new_server(tmp_path / "server2")
    data = archive.read_bytes()
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(data[: len(data) // 2])
    flipped = tmp_path / "flipped.tar"
    with tarfile.open(archive) as tar:
        manifest = json.loads(tar.extractfile("envmgr/export.json").read())
        env_name = next(m["name"] for m in manifest["members"] if m["part"] == "environment layer")
        env_member = tar.getmember(env_name)
    damaged = bytearray(data)
    damaged[env_member.offset_data + env_member.size // 2] ^= 0x01
    flipped.write_bytes(bytes(damaged))
    arm = tmp_path / "arm64.tar"
    _rewrite_for_arm64(archive, arm)

    cases = {truncated: "truncated", flipped: "environment layer is damaged", arm: "built for linux/arm64"}
    for path, expected in cases.items():
        proc = target.envmgr("import", str(path), check=False)
        assert proc.returncode == 2, proc.stderr
        assert expected in proc.stderr and "nothing was loaded" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and len(error_lines(proc.stderr)) <= 2
        _assert_nothing_loaded(target, engine)


def _with_manifest(archive: Path, out: Path, change=None, append_copy: bool = False) -> None:
    """The archive with its export.json changed by `change` (every other member as it is), and, with
    `append_copy`, a second member named envmgr/export.json at the end (unlisted)."""
    with tarfile.open(archive) as tar:
        items = [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]
    manifest = json.loads(items[0][1])
    if change:
        change(manifest)
    with tarfile.open(out, "w") as tar:
        for member, body in items:
            if member.name == "envmgr/export.json":
                body = json.dumps(manifest).encode()
                member.size = len(body)
            tar.addfile(member, io.BytesIO(body) if body is not None else None)
        if append_copy:
            extra = tarfile.TarInfo("envmgr/export.json")
            extra.size = len(items[0][1])
            tar.addfile(extra, io.BytesIO(items[0][1]))


def test_a_forged_export_json_creates_nothing_outside_the_base_dir(source, archive, tmp_path, engine):
    """Names in export.json become host paths only after they are checked whole: an absolute or `..`
    method or base name, or one ending in a newline, is refused before any folder is made."""
    _remove_images(engine)
    target = _new_server(tmp_path / "server2")
    outside = tmp_path / "outside"   # where an absolute name would have written method files
    forged = {
        "absolute": lambda m: m.update(method=str(outside / ".ssh")),
        "climbing": lambda m: m.update(method="../../../outside-climb"),
        "newline": lambda m: m.update(method=NAME + "\n"),
        "base": lambda m: m["base"].update(name="../../outside-base"),
    }
    for label, change in forged.items():
        path = tmp_path / f"{label}.tar"
        _with_manifest(archive, path, change)
        proc = target.envmgr("import", str(path), check=False)
        assert proc.returncode == 2, (label, proc.stderr)
        assert "export.json is malformed" in proc.stderr and "nothing was loaded" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr
        _assert_nothing_loaded(target, engine)
    assert not outside.exists()
    assert not list(tmp_path.rglob("outside-*")) and not list(target.base_dir.parent.rglob("outside-*"))

    # a second, unlisted export.json at the end is a member like any other: refused
    doubled = tmp_path / "doubled.tar"
    _with_manifest(archive, doubled, append_copy=True)
    proc = target.envmgr("import", str(doubled), check=False)
    assert proc.returncode == 2 and "unexpected member 'envmgr/export.json'" in proc.stderr, proc.stderr
    _assert_nothing_loaded(target, engine)


def test_import_on_a_wiped_server_registers_the_method_and_runs_offline(source, archive, tmp_path, engine,
                                                                        mirror_a):
    _remove_images(engine)
    target = _new_server(tmp_path / "server2")
    imported = _done(target.envmgr("--json", "import", str(archive)))
    assert imported["changed"] and imported["registered"] and imported["base_installed"]
    assert engine.images.get(source.built["tag"]).id == source.built["image"]
    assert (target.base_dir / "methods" / NAME / "poetry.lock").read_bytes() == \
        (source.method_dir / "poetry.lock").read_bytes()

    again = _done(target.envmgr("--json", "import", str(archive)))
    assert again["changed"] is False

    # No index and no network: the build is answered from the content hash, the run works.
    offline = target.env(ENVMGR_MIRRORS_PYPI="http://127.0.0.1:9/simple/")
    requests_before = len(mirror_a.requests)
    built = subprocess.run(["unshare", "--net", sys.executable, "-m", "envmgr", "--json", "build", NAME],
                           env=offline, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    assert _done(built)["reused"] and _done(built)["image"] == source.built["image"]
    ran = subprocess.run(["unshare", "--net", sys.executable, "-m", "envmgr", "--json", "run", NAME, "--gpus",
                          "none"], env=offline, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr
    run_dir = Path(_done(ran)["run_dir"])
    assert (run_dir / "log.txt").read_text().split()[:2] == ["alpha+beta-1.1", "hello"]
    assert len(mirror_a.requests) == requests_before


# ----------------------------------------------------------------------------- push / pull


def test_push_then_pull_into_a_server_without_the_image(source, registry, engine, tmp_path):
    pushed = _done(source.envmgr("--json", "push", NAME, registry, ENVMGR_REGISTRY_USER="admin",
                                 ENVMGR_REGISTRY_PASSWORD=SECRET))
    assert pushed["digest"].startswith("sha256:")
    recorded = json.loads((source.cache_dir / "pushed.json").read_text())
    assert recorded[pushed["reference"]]["digest"] == pushed["digest"]
    assert not [t for i in engine.images.list() for t in i.tags if t.startswith(registry)]

    _remove_images(engine)
    pulled = _done(source.envmgr("--json", "pull", NAME, registry))
    assert pulled["image_id"] == source.built["image"] and pulled["digest"] == pushed["digest"]
    assert engine.images.get(source.built["tag"]).id == source.built["image"]
    assert _done(source.envmgr("--json", "build", NAME))["reused"]
    assert not [t for i in engine.images.list() for t in i.tags if t.startswith(registry)]


def test_pull_refuses_an_image_whose_labels_do_not_match_the_lock(source, registry, engine):
    short = source.built["tag"].split(":")[1]
    forged = f"{registry}/{REPO}:{short}"
    base = engine.images.get("envmgr/base-bookworm-py311:latest")
    helper = engine.api.create_container(base.id, command=["true"])
    try:
        engine.api.commit(helper["Id"], repository=f"{registry}/{REPO}", tag=short,
                          changes=[f"LABEL org.envmgr.method={NAME} org.envmgr.lock-hash=0000"])
    finally:
        engine.api.remove_container(helper["Id"], force=True)
    for _ in engine.api.push(f"{registry}/{REPO}", tag=short, stream=True, decode=True):
        pass
    engine.images.remove(forged)
    proc = source.envmgr("pull", NAME, registry, check=False)
    assert proc.returncode == 1 and "does not match" in proc.stderr, proc.stderr
    assert engine.images.get(source.built["tag"]).id == source.built["image"]
    assert not [t for i in engine.images.list() for t in i.tags if t.startswith(registry)]
    # Put the real image back for later tests.
    source.envmgr("push", NAME, registry)


def test_registry_down_or_refusing_is_one_line_exit_5_without_credentials(source, tmp_path):
    down = source.envmgr("push", NAME, f"127.0.0.1:{_free_port()}", check=False,
                         ENVMGR_REGISTRY_USER="admin", ENVMGR_REGISTRY_PASSWORD=SECRET)
    assert down.returncode == 5, down.stderr
    assert "error:" in down.stderr and "Traceback" not in down.stderr
    assert SECRET not in down.stdout + down.stderr
    proc, readonly = _start_registry(tmp_path / "readonly", readonly=True)
    try:
        refused = source.envmgr("-v", "push", NAME, readonly, check=False,
                                ENVMGR_REGISTRY_USER="admin", ENVMGR_REGISTRY_PASSWORD=SECRET)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert refused.returncode == 5 and "refused" in refused.stderr, refused.stderr
    assert SECRET not in refused.stdout + refused.stderr


# ----------------------------------------------------------------------------- verify


def test_verify_matches_then_catches_a_changed_file(source, engine):
    ok = _done(source.envmgr("--json", "verify", NAME, mirror=source.mirror))
    assert ok["image_matches"] and ok["files_match"] and ok["files"] > 3
    assert not list(source.cache_dir.glob("verify-*")), "the scratch cache was not removed"

    helper = engine.api.create_container(source.built["image"], command=["sh", "-c",
                                         "echo 'NAME = \"evil\"' > /opt/envmgr/envs/tiny-transfer/lib/"
                                         "python3.11/site-packages/envmgr_beta/__init__.py"], network_disabled=True)
    try:
        engine.api.start(helper["Id"])
        engine.api.wait(helper["Id"])
        tampered = engine.api.commit(helper["Id"], repository=REPO, tag=source.built["tag"].split(":")[1])
    finally:
        engine.api.remove_container(helper["Id"], force=True)
    try:
        proc = source.envmgr("--json", "verify", NAME, mirror=source.mirror, check=False)
        assert proc.returncode == 1
        result = [e for e in _events(proc) if e.get("event") == "verify"][-1]
        assert not result["image_matches"] and result["in_use"] == tampered["Id"]
        assert [b[1:] for b in result["bad_files"]] == [["envmgr_beta/__init__.py", "changed"]]
    finally:
        engine.api.tag(source.built["image"], REPO, source.built["tag"].split(":")[1], force=True)
        engine.images.remove(tampered["Id"], force=True)


# ----------------------------------------------------------------------------- gc


def test_gc_removes_superseded_images_and_leftovers_but_nothing_in_use(source, engine):
    current = source.built["image"]
    made = []
    for note in ("old-1", "old-2", "old-3"):
        helper = engine.api.create_container(current, command=["true"])
        made.append(engine.api.commit(helper["Id"], repository=REPO, tag=note,
                                      changes=[f"LABEL org.envmgr.note={note}"])["Id"])
        engine.api.remove_container(helper["Id"])
        time.sleep(1.1)  # distinct tag times: old-3 is the most recent
    running = engine.containers.run(made[0], ["sleep", "300"], detach=True, network_mode="none",
                                    labels={"org.envmgr.managed": "true", "org.envmgr.method": NAME})
    stopped = engine.api.create_container(current, command=["true"],
                                          labels={"org.envmgr.managed": "true", "org.envmgr.method": NAME})
    engine.api.start(stopped["Id"])
    engine.api.wait(stopped["Id"])
    layers = source.cache_dir / "layers"
    stale = layers / f"method-{NAME}-{'0' * 32}.tar"
    stale.write_bytes(b"x" * 4096)
    stored = source.cache_dir / "store" / "layers"
    stale_stored = stored / ("0" * 64)   # a stored environment layer no image uses
    stale_stored.write_bytes(b"z" * 4096)
    leftover = source.cache_dir / "work" / f"method-{NAME}-leftover"
    leftover.mkdir(parents=True)
    (leftover / "file").write_bytes(b"y" * 1000)
    try:
        dry = _done(source.envmgr("--json", "gc", "--keep", "1", "--method", NAME, "--dry-run"))
        assert dry["dry_run"] and stale.exists() and leftover.exists()
        assert len(engine.images.list(REPO)) == 4

        done = _done(source.envmgr("--json", "gc", "--keep", "1", "--method", NAME))
        removed = {(i["kind"], i["what"]) for i in done["removed"]}
        assert removed == {(i["kind"], i["what"]) for i in dry["removed"]}
        assert ("image", made[1]) in removed                      # superseded, not in use, not most recent
        assert ("image", made[0]) not in removed                  # a running container uses it
        assert ("image", made[2]) not in removed                  # the most recent superseded one (--keep 1)
        assert ("container", stopped["Id"]) in removed
        assert ("layer", str(stale)) in removed and ("work", str(leftover)) in removed
        assert engine.images.get(current).id == current and engine.images.get(made[0]).id == made[0]
        assert not stale.exists() and not leftover.exists()
        assert ("layer", str(stale_stored)) in removed and not stale_stored.exists()
        env_layers = engine.images.get(current).attrs["RootFS"]["Layers"][1:-1]
        assert env_layers and all((stored / d.split(":", 1)[1]).is_file() for d in env_layers), \
            "a stored environment layer of the current image went"
        assert done["bytes_freed"] > 0
        plain = source.envmgr("gc", "--keep", "0", "--method", NAME, "--dry-run")
        assert "would remove image" in plain.stderr and "MB" in plain.stderr   # talk: on stderr
    finally:
        running.remove(force=True)
        for image_id in made:
            try:
                engine.images.remove(image_id, force=True)
            except Exception:  # noqa: BLE001 - removed by gc
                pass
        engine.api.remove_container(stopped["Id"], force=True) if engine.containers.list(
            all=True, filters={"id": stopped["Id"]}) else None
