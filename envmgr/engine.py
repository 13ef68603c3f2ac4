"""The only module that talks to the Docker Engine (through the docker SDK, never a CLI)."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import docker
import docker.errors
import requests
from docker.types import DeviceRequest, Mount

from . import paths
from .errors import EngineError, Interrupted, UsageError

ENGINE_HINT = ("start it with `sudo systemctl start docker`, or `sudo dockerd &` where there is no systemd; "
               "`envmgr doctor` shows what envmgr sees")
NVIDIA_HINT = ("this engine has no NVIDIA runtime: install the NVIDIA Container Toolkit on the host "
               "(and restart the engine), or run on the CPU with `--gpus none`")


class Engine:
    def __init__(self, url: str | None = None, timeout: int = 600):
        self.url = url
        try:
            if url:
                self.client = docker.DockerClient(base_url=url, timeout=timeout)
            else:
                self.client = docker.from_env(timeout=timeout)
            self.client.ping()
        except docker.errors.DockerException as exc:
            where = url or "the default socket (DOCKER_HOST or /var/run/docker.sock)"
            raise EngineError(f"Docker Engine not reachable at {where}: {_short(exc)}", hint=ENGINE_HINT) from None
        self.api = self.client.api

    # ------------------------------------------------------------------ images

    def image_id(self, ref: str) -> str | None:
        try:
            return self.api.inspect_image(ref)["Id"]
        except docker.errors.ImageNotFound:
            return None
        except docker.errors.APIError as exc:
            raise EngineError(f"engine refused to inspect image {ref}: {_short(exc)}") from None

    def inspect_image(self, ref: str) -> dict[str, Any] | None:
        try:
            return self.api.inspect_image(ref)
        except docker.errors.ImageNotFound:
            return None

    def load_archive(self, archive: BinaryIO) -> list[str]:
        """Load a docker-archive; returns the image IDs / tags the engine reports."""
        loaded = []
        try:
            for chunk in self.api.load_image(archive):
                for line in _json_lines(chunk):
                    if "error" in line:
                        raise EngineError(f"engine refused the image archive: {line['error']}")
                    stream = line.get("stream", "")
                    if "Loaded image" in stream:
                        loaded.append(stream.split(":", 1)[1].strip())
        except docker.errors.APIError as exc:
            raise EngineError(f"engine refused the image archive: {_short(exc)}") from None
        return loaded

    def present_layers(self, diff_ids: list[str]) -> frozenset[str]:
        """The longest prefix of `diff_ids` whose layer chain some envmgr image in the engine has."""
        best: list[str] = []
        for summary in self.api.images(filters={"label": paths.LABEL_MANAGED}):
            layers = (self.api.inspect_image(summary["Id"]).get("RootFS") or {}).get("Layers") or []
            common = 0
            while common < min(len(layers), len(diff_ids)) and layers[common] == diff_ids[common]:
                common += 1
            if common > len(best):
                best = diff_ids[:common]
        return frozenset(best)

    def tag(self, image_id: str, repository: str, tag: str) -> None:
        self.api.tag(image_id, repository, tag, force=True)

    def images_with_label(self, label: str) -> list[dict[str, Any]]:
        return self.api.images(filters={"label": label})

    def remove_image(self, ref: str, force: bool = False) -> None:
        with contextlib.suppress(docker.errors.ImageNotFound):
            self.api.remove_image(ref, force=force)

    def registry_has(self, reference: str) -> bool:
        """Whether the registry of `reference` (host[:port]/repo:tag) answers for it (asked through the engine)."""
        try:
            self.api.inspect_distribution(reference)
            return True
        except docker.errors.APIError:
            return False

    def has_nvidia_runtime(self) -> bool:
        """A registered `nvidia` runtime (the quick answer; `gpus_work` is the sure one)."""
        return "nvidia" in (self.api.info().get("Runtimes") or {})

    def gpus_work(self, image: str, device_requests: list[DeviceRequest]) -> bool:
        """Whether the engine can hand these GPUs to a container.

        `--gpus` works through the NVIDIA Container Toolkit's hook even when no `nvidia` runtime is
        registered, so when none is, a throw-away container of `image` running `true` asks.
        """
        if self.has_nvidia_runtime():
            return True
        container_id = None
        try:
            hc = self.api.create_host_config(device_requests=device_requests, network_mode="none")
            container_id = self.api.create_container(image, ["true"], host_config=hc,
                                                     labels={paths.LABEL_MANAGED: "true",
                                                             paths.LABEL_KIND: "gpu-probe"})["Id"]
            self.api.start(container_id)
            self.api.wait(container_id, timeout=120)
            return True
        except docker.errors.APIError as exc:
            if "could not select device driver" in str(exc):
                return False
            raise EngineError(f"engine refused a GPU probe container: {_short(exc)}") from None
        finally:
            if container_id:
                with contextlib.suppress(Exception):
                    self.api.remove_container(container_id, force=True)

    # ------------------------------------------------------------------ containers

    def run(self, spec: "ContainerSpec", on_line: Callable[[str], None] | None = None,
            on_start: Callable[[str], None] | None = None) -> int:
        """Create, start and follow a container; it is removed however this ends. Returns the exit code."""
        kwargs: dict[str, Any] = dict(
            image=spec.image, command=spec.command, environment=spec.env, working_dir=spec.workdir,
            user=spec.user, labels={paths.LABEL_MANAGED: "true", **spec.labels}, detach=True,
            name=spec.name or f"envmgr-{uuid.uuid4().hex[:12]}",
        )
        host_config = dict(
            mounts=[Mount(target=m.target, source=str(m.source), type="bind", read_only=m.read_only)
                    for m in spec.mounts],
            network_mode=spec.network, auto_remove=False, init=True,
            shm_size=spec.shm_size, device_requests=spec.device_requests or None,
        )
        container_id = None
        try:
            hc = self.api.create_host_config(**{k: v for k, v in host_config.items() if v is not None})
            created = self.api.create_container(host_config=hc, **{k: v for k, v in kwargs.items()
                                                                     if k != "detach"})
            container_id = created["Id"]
            try:
                self.api.start(container_id)
            except docker.errors.APIError as exc:
                if "could not select device driver" in str(exc) and "gpu" in str(exc):
                    raise UsageError(f"cannot give the container GPUs: {NVIDIA_HINT}") from None
                raise EngineError(f"engine could not start the container: {_short(exc)}") from None
            if on_start:
                on_start(container_id)
            self._follow(container_id, on_line)
            result = self.api.wait(container_id)
            spec.oom_killed = bool(self.api.inspect_container(container_id)["State"].get("OOMKilled"))
            return int(result.get("StatusCode", 1))
        except KeyboardInterrupt:
            if container_id:
                with contextlib.suppress(Exception):
                    self.api.stop(container_id, timeout=spec.stop_timeout)
            raise Interrupted("interrupted") from None
        except docker.errors.ImageNotFound as exc:
            raise EngineError(f"image not found in the engine: {_short(exc)}") from None
        except docker.errors.APIError as exc:
            raise EngineError(f"engine error: {_short(exc)}") from None
        except requests.exceptions.ConnectionError:
            raise EngineError("the Docker Engine stopped answering while the container ran",
                              hint=ENGINE_HINT) from None
        finally:
            if container_id:
                with contextlib.suppress(Exception):
                    self.api.remove_container(container_id, force=True)

    def stop(self, container_id: str, timeout: int = 30) -> None:
        with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
            self.api.stop(container_id, timeout=timeout)

    def _follow(self, container_id: str, on_line: Callable[[str], None] | None) -> None:
        buffer = b""
        for chunk in self.api.logs(container_id, stream=True, follow=True, stdout=True, stderr=True):
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                if on_line:
                    on_line(line.decode("utf-8", errors="replace").rstrip("\r"))
        if buffer and on_line:
            on_line(buffer.decode("utf-8", errors="replace"))

    def containers_with_label(self, label: str, all_: bool = True) -> list[dict[str, Any]]:
        return self.api.containers(all=all_, filters={"label": label})


@dataclass
class BindMount:
    source: Path
    target: str
    read_only: bool = True


@dataclass
class ContainerSpec:
    image: str
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    mounts: list[BindMount] = field(default_factory=list)
    workdir: str | None = None
    user: str | None = None
    network: str | None = "none"
    labels: dict[str, str] = field(default_factory=dict)
    shm_size: str | None = None
    device_requests: list[DeviceRequest] = field(default_factory=list)
    name: str | None = None
    stop_timeout: int = 30
    oom_killed: bool = False


def gpu_device_requests(gpus: str) -> list[DeviceRequest]:
    """`all`, `none`, a count (`2`) or a list of indices (`0,1`) -> Engine device requests."""
    gpus = gpus.strip().lower()
    if gpus in ("none", "0", ""):
        return []
    if gpus == "all":
        return [DeviceRequest(count=-1, capabilities=[["gpu"]])]
    if gpus.isdigit():
        return [DeviceRequest(count=int(gpus), capabilities=[["gpu"]])]
    ids = [part.strip() for part in gpus.split(",")]
    if all(ids):
        return [DeviceRequest(device_ids=ids, capabilities=[["gpu"]])]
    raise UsageError(f"--gpus {gpus!r}: expected all, none, a count such as 2, or indices such as 0,1")


def _json_lines(chunk: bytes | str | dict) -> Iterator[dict[str, Any]]:
    if isinstance(chunk, dict):
        yield chunk
        return
    text = chunk.decode("utf-8", errors="replace") if isinstance(chunk, bytes) else chunk
    for raw in text.splitlines():
        raw = raw.strip()
        if raw:
            try:
                yield json.loads(raw)
            except json.JSONDecodeError:
                yield {"stream": raw}


def _short(exc: BaseException) -> str:
    text = getattr(exc, "explanation", None) or str(exc)
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    return " ".join(str(text).split())[:300]

