"""Use the Docker Engine that answers, or start the machine's one dockerd (never a second one)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time

import docker
import docker.errors


def _answers() -> bool:
    try:
        docker.from_env(timeout=5).ping()
        return True
    except docker.errors.DockerException:
        return False


def ensure_engine(timeout: float = 60.0) -> None:
    if _answers():
        return
    dockerd = shutil.which("dockerd")
    if dockerd is None or os.geteuid() != 0:
        raise RuntimeError("no Docker Engine answers and this user cannot start one: "
                           "install docker.io and run `sudo dockerd &` (or `make engine`)")
    if subprocess.run(["pgrep", "-x", "dockerd"], capture_output=True).returncode != 0:
        print("engine: no engine answers: starting dockerd (log: /tmp/envmgr-dockerd.log)", file=sys.stderr, flush=True)
        log = open("/tmp/envmgr-dockerd.log", "ab")
        subprocess.Popen([dockerd], stdout=log, stderr=log, start_new_session=True)
    else:
        print("engine: dockerd is running but does not answer yet: waiting", file=sys.stderr, flush=True)
    started = time.monotonic()
    deadline = started + timeout
    while time.monotonic() < deadline:
        if _answers():
            print(f"engine: dockerd answers after {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
            return
        time.sleep(0.5)
    raise RuntimeError("dockerd did not answer within 60 s; see /tmp/envmgr-dockerd.log")


def drop_images_holding(engine, distributions: set[str]) -> int:
    """Remove every image whose layer-facts label lists one of `distributions`: the images a new cache learns
    layers from (issue 26). A test whose build must install them starts from an engine that lacks them."""
    from packaging.utils import canonicalize_name

    from envmgr.build.layer_facts import LABEL, ImageFacts

    wanted = {canonicalize_name(name) for name in distributions}
    removed = 0
    for image in engine.images.list(filters={"label": LABEL}):
        facts = ImageFacts.from_labels(image.labels)
        if facts is not None and any(canonicalize_name(unit.name) in wanted
                                     for layer in facts.layers for unit in layer.units):
            with contextlib.suppress(docker.errors.NotFound):
                engine.images.remove(image.id, force=True)
                removed += 1
    return removed


def default_sigint() -> None:
    """preexec_fn for a child a test interrupts: SIGINT as a terminal delivers it, also when the tests run
    from a background job (which inherits SIGINT ignored, and so would the child)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
