"""Grouping of distributions into environment layers, and the layer store (no engine)."""

from __future__ import annotations

import hashlib
import os

import pytest

from envmgr.build.layers import (
    BIG_BYTES,
    BUCKETS,
    MAX_ENV_LAYERS,
    LayerStore,
    bucket_of,
    canonical_requirement,
    plan_groups,
    units,
)
from envmgr.lock.backends.common import split_requirements

LAYOUT = "4"


def entry(name: str, version: str, *hashes: str) -> str:
    hashes = hashes or (hashlib.sha256(f"{name}{version}".encode()).hexdigest(),)
    return f"{name}=={version} \\\n" + " \\\n".join(f"    --hash=sha256:{h}" for h in hashes)


def make(pins: dict[str, str]):
    return units([entry(n, v) for n, v in pins.items()], "3.11.2", "uv 0.9", LAYOUT)


PINS = {f"pkg-{i:03d}": "1.0" for i in range(120)} | {"torch": "2.13.0", "nvidia-cublas": "13.0", "numpy": "2.3"}
SIZES_BY_NAME = {"torch": 1500 << 20, "nvidia-cublas": 700 << 20, "numpy": 40 << 20}


def sizes_for(dists) -> dict[str, int | None]:
    return {u.key: SIZES_BY_NAME.get(u.name, 100_000) for u in dists}


def by_label(groups) -> dict[str, str]:
    return {g.label: g.key for g in groups}


def test_canonical_requirement_ignores_hash_order_comments_and_spacing():
    a = canonical_requirement("Foo_Bar==1.0 \\\n    --hash=sha256:bb \\\n    --hash=sha256:aa\n    # via x")
    b = canonical_requirement("foo-bar==1.0   --hash=sha256:aa --hash=sha256:bb")
    assert a == b and a[0] == "foo-bar"
    with pytest.raises(ValueError):
        canonical_requirement("foo>=1.0 --hash=sha256:aa")
    with pytest.raises(ValueError):
        canonical_requirement("foo==1.0")


def test_split_requirements_keeps_continuations_together():
    text = ("# envmgr lock: abc\n" + entry("a", "1", "11", "12") + "\n    # via b\n"
            + entry("b", "2", "21") + "\n")
    parts = split_requirements(text)
    assert [canonical_requirement(p)[0] for p in parts] == ["a", "b"]
    assert "--hash=sha256:12" in parts[0]


def test_unit_keys_depend_on_the_pin_python_and_prefix_only():
    one, = units([entry("a", "1")], "3.11.2", "uv 0.9", LAYOUT)
    again, = units([entry("a", "1")], "3.11.2", "uv 0.9", LAYOUT)
    assert one.key == again.key
    assert units([entry("a", "2")], "3.11.2", "uv 0.9", LAYOUT)[0].key != one.key
    assert units([entry("a", "1")], "3.12.0", "uv 0.9", LAYOUT)[0].key != one.key
    assert units([entry("a", "1")], "3.11.2", "uv 0.9", LAYOUT, prefix="/elsewhere")[0].key != one.key


def test_big_distributions_get_their_own_layers_largest_lowest():
    dists = make(PINS)
    groups = plan_groups(dists, sizes_for(dists), LAYOUT)
    assert [g.label for g in groups if g.kind == "big"] == ["torch", "nvidia-cublas", "numpy"]
    assert all(g.kind == "bucket" for g in groups[3:])
    assert 1 + len(groups) <= MAX_ENV_LAYERS
    members = [u.name for g in groups for u in g.members]
    assert sorted(members) == sorted(PINS) and len(set(members)) == len(members)


def test_a_pin_bump_changes_only_its_own_group():
    before = make(PINS)
    after = make(PINS | {"pkg-042": "1.1"})
    old = by_label(plan_groups(before, sizes_for(before), LAYOUT))
    new = by_label(plan_groups(after, sizes_for(after), LAYOUT))
    changed = [label for label in old if old[label] != new.get(label)]
    assert changed == [f"bucket-{bucket_of('pkg-042'):02d}"]


def test_adding_a_distribution_changes_one_bucket_and_torch_stays():
    before = make(PINS)
    after = make(PINS | {"brand-new": "0.1"})
    old = by_label(plan_groups(before, sizes_for(before), LAYOUT))
    new = by_label(plan_groups(after, sizes_for(after), LAYOUT))
    changed = {label for label in new if old.get(label) != new[label]}
    assert changed == {f"bucket-{bucket_of('brand-new'):02d}"}
    assert old["torch"] == new["torch"]


def test_too_many_big_distributions_fold_the_smallest_into_buckets():
    pins = {f"huge-{i:02d}": "1" for i in range(40)}
    dists = make(pins)
    sizes = {u.key: BIG_BYTES + int(u.name[-2:]) for u in dists}
    groups = plan_groups(dists, sizes, LAYOUT)
    bigs = [g.label for g in groups if g.kind == "big"]
    assert len(bigs) == MAX_ENV_LAYERS - 1 - BUCKETS
    assert bigs[0] == "huge-39" and "huge-00" not in bigs   # the largest keep their own layers
    assert 1 + len(groups) <= MAX_ENV_LAYERS
    assert plan_groups(list(reversed(dists)), sizes, LAYOUT) == groups   # input order does not matter


def test_unknown_sizes_count_as_small():
    dists = make({"torch": "2.13.0", "a": "1"})
    groups = plan_groups(dists, {u.key: None for u in dists}, LAYOUT)
    assert all(g.kind == "bucket" for g in groups)


def test_store_reuses_a_layer_and_detects_damage(tmp_path):
    warnings: list[str] = []
    store = LayerStore(tmp_path / "store", warn=warnings.append)
    tree = tmp_path / "tree"
    (tree / "lib").mkdir(parents=True)
    (tree / "lib" / "x.py").write_bytes(b"X = 1\n" * 1000)
    layer = store.put_group("k1", [(tree, "/opt/envmgr/envs/.shared")])
    assert layer.path.name == layer.diff_id.split(":")[1]
    again = store.group("k1")
    assert again is not None and again.diff_id == layer.diff_id and not warnings
    # touched but intact: hashed once, still used
    os.utime(layer.path, ns=(1, 1))
    assert store.group("k1") is not None and not warnings
    data = bytearray(layer.path.read_bytes())
    data[600] ^= 1
    layer.path.write_bytes(bytes(data))
    assert store.group("k1") is None
    assert warnings and "damaged" in warnings[0]
    assert not layer.path.exists()
    assert store.group("missing") is None
    store.put_dist("d1", size=5, name="a")
    assert store.dist("d1") == {"name": "a", "size": 5}
    assert store.dist("d2") == {}
