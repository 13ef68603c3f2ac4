"""[system] apt: validated package names, a cache key and an image tag that follow the package list only."""

import pytest
from pydantic import ValidationError

from envmgr.build.system_layer import system_key
from envmgr.core.spec import MethodSpec
from envmgr.images.base import BaseImage

BASE = BaseImage(name="bookworm-py311", image_id="sha256:" + "3" * 64, diff_id="sha256:" + "1" * 64,
                 layer_path="/nonexistent", python="/usr/bin/python3.11", python_version="3.11.2", packages={})


def _spec(**fields) -> MethodSpec:
    return MethodSpec(name="third", entry=["bash", "train.sh"], **fields)


def test_package_names_are_debian_names_only():
    assert _spec(system={"apt": ["libgl1", "libglib2.0-0", "libgl1=1.6.0-1"]}).system.apt[0] == "libgl1"
    for bad in ("libgl1; rm -rf /", "$(id)", "-o=APT::Foo", "LibGL"):
        with pytest.raises(ValidationError):
            _spec(system={"apt": [bad]})


def test_the_package_list_changes_the_spec_hash_and_the_cache_key_but_not_its_order():
    plain = _spec()
    assert plain.spec_hash() == _spec(system={"apt": []}).spec_hash(), "specs without packages keep their hash"
    with_gl = _spec(system={"apt": ["libgl1", "libyaml-0-2"]})
    assert with_gl.spec_hash() != plain.spec_hash()
    assert system_key(with_gl, BASE) == system_key(_spec(system={"apt": ["libyaml-0-2", "libgl1", "libgl1"]}), BASE)
    assert system_key(with_gl, BASE) != system_key(_spec(system={"apt": ["libgl1"]}), BASE)


def test_dataset_mode_does_not_change_the_image():
    assert _spec(dataset_mode="writable").spec_hash() == _spec().spec_hash()
