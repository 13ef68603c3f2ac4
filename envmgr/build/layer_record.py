"""The recorded environment layers of a built-in method (`envs/<m>/env-layers.json`): proof across machines.

Environment layers depend only on the lock, the installer, the base's Python version and the layout,
so their diff IDs can be written down in the repository and compared with a build from clean caches
anywhere. `make record-layers` (python -m envmgr.build.layer_record sd-demo) writes the record; a lock or
layout change updates it in the same commit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RECORD = "env-layers.json"


def env_diff_ids(diff_ids: list[str]) -> list[str]:
    """An envmgr method image's environment layers: all but the first (base) and the last (method files)."""
    return list(diff_ids[1:-1])


def record_path(spec) -> Path:
    return spec.folder / RECORD


def current(ctx, spec) -> dict:
    """What a build of `spec` gives now: its environment layers, bottom first, with their labels and sizes."""
    from envmgr.build.target import target

    wanted = target(ctx, spec)
    config = wanted.config(ctx)
    labels = [text.removeprefix("envmgr environment ") for text in config.history[1:-1]]
    return {
        "method": spec.name,
        "lock": wanted.inputs["lock"],
        "layout": wanted.inputs["layout"],
        "installer": wanted.inputs["installer"],
        "python": wanted.base.python_version,
        "layers": [{"label": label, "diff_id": layer.diff_id, "size": layer.size}
                   for label, layer in zip(labels, config.layers[1:-1], strict=True)],
    }


def main(argv: list[str] | None = None) -> int:
    from envmgr.core.config import load_config
    from envmgr.core.spec import find_method
    from envmgr.core.ui import Reporter
    from envmgr.door.context import Context

    names = (argv if argv is not None else sys.argv[1:]) or ["sd-demo"]
    ctx = Context(config=load_config({}), ui=Reporter("plain"))
    for name in names:
        spec = find_method(name, ctx.config.base_dir)
        data = current(ctx, spec)
        record_path(spec).write_text(json.dumps(data, indent=1) + "\n")
        print(f"{record_path(spec)}: {len(data['layers'])} environment layers")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
