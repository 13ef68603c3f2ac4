"""gc of the per-image records in the cache (SBOMs, signature records), against a fake engine."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from envmgr.core.config import load_config
from envmgr.core.ui import Reporter
from envmgr.door.context import Context
from envmgr.gc.gc import apply, plan

KEPT = "sha256:" + "a" * 64
GONE = "sha256:" + "b" * 64
OTHER_GONE = "sha256:" + "c" * 64


class _Engine:
    """An engine holding one image; `images_now` can change between plan and apply."""

    def __init__(self):
        self.images_now = {KEPT}

    def image_id(self, ref):
        return ref if ref in self.images_now else None

    def containers(self, label=None):
        return []

    def images(self, label=None, all_=False):
        return []

    def inspect_image(self, ref):
        return None


def _ctx(tmp_path: Path) -> tuple[Context, _Engine]:
    (tmp_path / "base").mkdir()
    config = load_config({"base_dir": str(tmp_path / "base"), "cache_dir": str(tmp_path / "cache")}, files=[])
    engine = _Engine()
    return Context(config=config, ui=Reporter("json"), _engine=engine), engine  # type: ignore[arg-type]


def _sbom(cache: Path, image_id: str, method: str) -> Path:
    path = cache / "sbom" / f"{image_id.removeprefix('sha256:')}.cdx.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"metadata": {"component": {"properties": [
        {"name": "envmgr:method", "value": method}]}}}))
    return path


def _signature(cache: Path, image_id: str, method: str) -> Path:
    path = cache / "signatures" / f"{image_id.removeprefix('sha256:')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    statement = json.dumps({"method": method, "image_id": image_id}).encode()
    path.write_text(json.dumps({"kind": "export", "statement": base64.b64encode(statement).decode(),
                                "signature": None}))
    return path


def test_gc_removes_records_whose_image_is_gone_and_never_one_whose_image_exists(tmp_path):
    ctx, _ = _ctx(tmp_path)
    kept = [_sbom(ctx.cache_dir, KEPT, "m"), _signature(ctx.cache_dir, KEPT, "m")]
    gone = [_sbom(ctx.cache_dir, GONE, "m"), _signature(ctx.cache_dir, GONE, "m")]
    temp = ctx.cache_dir / "sbom" / f".{'b' * 64}.cdx.json.123.partial"   # not a record: left alone here
    temp.write_text("{}")

    dry = plan(ctx)
    assert {(i.kind, i.what) for i in dry.remove} == {("sbom", str(gone[0])), ("signature", str(gone[1]))}
    assert all("its image is gone" in i.why for i in dry.remove)
    assert all(p.exists() for p in kept + gone)          # a plan removes nothing

    done = apply(ctx, dry)
    assert len(done.remove) == 2 and not any(p.exists() for p in gone)
    assert all(p.exists() for p in kept) and temp.exists()


def test_gc_for_some_methods_removes_only_their_records(tmp_path):
    ctx, _ = _ctx(tmp_path)
    (ctx.config.base_dir / "methods" / "m").mkdir(parents=True)
    (ctx.config.base_dir / "methods" / "m" / "envmgr.toml").write_text(
        'name = "m"\nbackend = "poetry"\nentry = ["python", "main.py"]\n')
    mine = _sbom(ctx.cache_dir, GONE, "m")
    theirs = _sbom(ctx.cache_dir, OTHER_GONE, "someone-else")
    unreadable = _signature(ctx.cache_dir, OTHER_GONE, "x")
    unreadable.write_text("not json")
    removed = {i.what for i in plan(ctx, methods=["m"]).remove}
    assert removed == {str(mine)}
    assert str(theirs) not in removed and str(unreadable) not in removed


def test_a_record_whose_image_came_back_between_plan_and_apply_is_kept(tmp_path):
    ctx, engine = _ctx(tmp_path)
    record = _sbom(ctx.cache_dir, GONE, "m")
    dry = plan(ctx)
    assert [i.what for i in dry.remove] == [str(record)]
    engine.images_now.add(GONE)                           # an import loaded it meanwhile
    done = apply(ctx, dry)
    assert record.exists() and not done.remove
    assert [i.why for i in done.keep if i.what == str(record)] == ["its image is in the engine again"]


def test_gc_removes_partial_images_of_an_interrupted_load_unless_a_build_runs_or_a_container_uses_one(tmp_path):
    import fcntl

    from envmgr.core import paths
    from envmgr.core.files import open_lock

    ctx, engine = _ctx(tmp_path)
    partial = {"Id": GONE, "Labels": {paths.LABEL_MANAGED: "true", paths.LABEL_PARTIAL: KEPT}}
    used = {"Id": OTHER_GONE, "Labels": {paths.LABEL_MANAGED: "true", paths.LABEL_PARTIAL: KEPT}}
    engine.images = lambda label=None, all_=False: [partial, used] if label == paths.LABEL_PARTIAL else []
    engine.containers = lambda label=None: [{"Id": "c1", "ImageID": OTHER_GONE, "State": "running", "Labels": {}}]
    engine.image_history = lambda image_id: None      # sizes: none known here
    engine.image_disk_usage = lambda: []
    assert [(i.kind, i.what) for i in plan(ctx).remove] == [("image", GONE)]

    (ctx.cache_dir / "locks").mkdir(parents=True)
    with open_lock(ctx.cache_dir / "locks" / "build-m.lock") as guard:   # a build loading in steps now
        fcntl.flock(guard, fcntl.LOCK_EX)
        assert plan(ctx).remove == []
