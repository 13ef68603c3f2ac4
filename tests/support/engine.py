"""Use the Docker Engine that answers, or start the machine's one dockerd (never a second one)."""

from __future__ import annotations

import os
import shutil
import subprocess
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
        log = open("/tmp/envmgr-dockerd.log", "ab")
        subprocess.Popen([dockerd], stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _answers():
            return
        time.sleep(0.5)
    raise RuntimeError("dockerd did not answer within 60 s; see /tmp/envmgr-dockerd.log")
