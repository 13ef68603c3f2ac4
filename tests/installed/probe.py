"""Run by an interpreter (the checkout's venv or an installed wheel's): prints, as JSON, what the built-in
methods' inputs hashes are, where envmgr found envs/ and images/, and its version line. No engine, no build:
the base image ID is fixed, so only what this envmgr reads from its own files can differ."""

import json

from envmgr.build import target as build
from envmgr.core import paths
from envmgr.core.config import load_config
from envmgr.core.spec import list_methods
from envmgr.core.ui import Reporter
from envmgr.core.version import describe
from envmgr.door.context import Context
from envmgr.images.base import BaseImage, load_definition

BASE = BaseImage(name="bookworm-py311", image_id="sha256:" + "b" * 64, diff_id="sha256:" + "d" * 64,
                 layer_path="/nonexistent", python="/usr/bin/python3.11", python_version="3.11.2", packages={})

ctx = Context(config=load_config({}, inherit_host=False, files=[]), ui=Reporter("plain"))
methods = {}
for spec in list_methods(None):
    data = build.inputs(ctx, spec, BASE)
    digest = build.inputs_digest(data)
    methods[spec.name] = {"folder": str(spec.folder), "inputs": data, "inputs_hash": digest,
                          "tag": build.image_tag(spec, digest)}
print(json.dumps({"envmgr": build.__file__, "methods": methods, "version": describe(),
                  "base_definition": load_definition("bookworm-py311").model_dump(),
                  "origins": {name: paths.builtin_origin(name) for name in ("envs", "images")}}))
