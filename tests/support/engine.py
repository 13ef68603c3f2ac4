"""Use the Docker Engine that answers, or start the machine's one dockerd (never a second one)."""

from __future__ import annotations

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
