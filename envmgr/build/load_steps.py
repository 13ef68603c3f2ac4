"""Loading an image in steps: the engine registers one group of layers while the next group's bytes arrive.

Engine 20.10's loader unpacks a whole archive into a temporary folder before it registers the first layer
from there, so one archive costs the sum of both passes. Here the image goes as chain-prefix images (a
config whose rootfs is the base up to layer k, labelled LABEL_PARTIAL, no tag) in archives that each carry
only their new layers: step k+1's layer bytes are sent while step k registers, and its last bytes
(manifest.json, which the loader reads only once the stream has ended) are held back until step k's answer
came, so step k+1 always finds its parent chain. The last step is the image itself (same config, same ID);
the partial images are removed after it (their layers stay: the image holds them).

Measured (tests/bench/load_paths_bench.py, 2 busy cores): sd-demo's own 5.5 GB of layers 45.5 s against
57.2 s as one archive; the gain is mostly the temp copy that a step deletes before the kernel writes it
back (the disks wrote about 5 GB less), the overlap adds little where the engine already fills both cores.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

from envmgr.core import paths
from envmgr.core.errors import EngineError, UsageError
from envmgr.door.engine import Engine
from envmgr.images.image import ImageConfig, Piece, archive_pieces, pieces_size

STEP_BYTES = 256 << 20   # the step size measured (a step's fixed cost: a request, a temp folder, an image record)


def step_bytes_setting() -> int:
    """Bytes of new layers per step: STEP_BYTES, or ENVMGR_LOAD_STEP_BYTES (0: the image as one archive)."""
    value = os.environ.get(paths.ENV_LOAD_STEP_BYTES, "").strip()
    try:
        return int(value) if value else STEP_BYTES
    except ValueError:
        raise UsageError(f"{paths.ENV_LOAD_STEP_BYTES}={value!r} is not a whole number of bytes",
                         hint=f"0 loads the image as one archive; {STEP_BYTES} is the measured step") from None


def _held(config: ImageConfig, present: frozenset[str]) -> int:
    """How many of the bottom layers the engine holds as a chain (`present` names a prefix)."""
    count = 0
    while count < len(config.layers) and config.layers[count].diff_id in present:
        count += 1
    return count


def steps(config: ImageConfig, present: frozenset[str], step_bytes: int | None = None) -> list[ImageConfig]:
    """The images to load in turn: chain prefixes that each end once `step_bytes` of layers the engine lacks
    are in, then `config` itself. One step when there is nothing to split (or `step_bytes` is 0)."""
    step_bytes = step_bytes_setting() if step_bytes is None else step_bytes
    if step_bytes <= 0:
        return [config]
    cuts, gathered = [], 0
    for index in range(_held(config, present), len(config.layers)):
        gathered += config.layers[index].size
        if gathered >= step_bytes:
            cuts.append(index + 1)
            gathered = 0
    image_id = config.image_id()
    prefixes = [replace(config, layers=config.layers[:cut], history=config.history[:cut], env={}, cmd=None,
                        entrypoint=None, workdir=None,
                        labels={paths.LABEL_MANAGED: "true", paths.LABEL_PARTIAL: image_id})
                for cut in cuts if cut < len(config.layers)]
    return [*prefixes, config]


def step_archives(config: ImageConfig, present: frozenset[str],
                  step_bytes: int | None = None) -> list[tuple[ImageConfig, list[Piece]]]:
    """Each step's image and archive pieces, carrying the layers above the chain the step before left (a
    layer also found lower down is sent again: the engine registers it on a new chain). The last piece is the
    archive's end (manifest.json and the end blocks), which a step holds back."""
    out = []
    below = _held(config, present)
    for step in steps(config, present, step_bytes):
        new = {layer.diff_id for layer in step.layers[below:]}
        pieces = archive_pieces(step, [], frozenset(layer.diff_id for layer in step.layers[:below]) - new)
        last = pieces[-1]
        assert isinstance(last, bytes) and b"manifest.json" in last, "the archive must end with its manifest"
        out.append((step, pieces))
        below = len(step.layers)
    return out


class _Abandoned(Exception):
    """An earlier step failed: this step's archive is cut short (the engine drops it)."""


@dataclass
class _Step:
    config: ImageConfig
    pieces: list[Piece]
    sent: threading.Event = field(default_factory=threading.Event)    # all but the held-back end
    done: threading.Event = field(default_factory=threading.Event)    # the engine answered (or it failed)
    error: BaseException | None = None


def load_in_steps(engine: Engine, config: ImageConfig, present: frozenset[str],
                  progress: Callable[[int], None] | None = None, step_bytes: int | None = None) -> str:
    """Load `config` (the engine holds the layers in `present`) in overlapping steps; returns its image ID.
    An engine error of any step is raised once the steps have stopped; the partial images that loaded stay
    (labelled: the next build or `envmgr gc` removes them) and their layers count as present."""
    plan = [_Step(step, pieces) for step, pieces in step_archives(config, present, step_bytes)]
    counting = threading.Lock()

    def advance(size: int) -> None:   # two steps send at once; a progress counter need not be thread-safe
        if progress is not None:
            with counting:
                progress(size)

    def gated(step: _Step, before: _Step | None) -> Iterator[Piece]:
        yield from step.pieces[:-1]
        step.sent.set()
        if before is not None:
            before.done.wait()
            if before.error is not None:
                raise _Abandoned
        yield step.pieces[-1]

    def send(step: _Step, before: _Step | None) -> None:
        try:
            engine.load_files(gated(step, before), pieces_size(step.pieces), progress=advance)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller below
            step.error = exc
        finally:
            step.sent.set()
            step.done.set()

    threads = []
    for index, step in enumerate(plan):
        if index >= 2:
            plan[index - 2].done.wait()   # at most one step unpacking ahead of the one registering
        if any(s.error for s in plan[:index]):
            break
        thread = threading.Thread(target=send, args=(step, plan[index - 1] if index else None), daemon=True)
        thread.start()
        threads.append(thread)
        step.sent.wait()
    for thread in threads:
        thread.join()
    errors = [s.error for s in plan if s.error is not None and not isinstance(s.error, _Abandoned)]
    if errors:
        raise errors[0]
    remove_partials(engine, config.image_id())
    return config.image_id()


def remove_partials(engine: Engine, image_id: str | None = None) -> int:
    """Remove the partial images of a stepped load (of `image_id`, else all of them); returns how many went.
    An image the engine refuses to remove stays for the next time."""
    gone = 0
    for summary in engine.images(label=paths.LABEL_PARTIAL, all_=True):
        if image_id and (summary.get("Labels") or {}).get(paths.LABEL_PARTIAL) != image_id:
            continue
        with contextlib.suppress(EngineError):
            engine.remove_image(summary["Id"])
            gone += 1
    return gone
