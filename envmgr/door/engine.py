"""The only module that talks to the Docker Engine (through the docker SDK, never a CLI).

What to run comes in as the plain values of `containers.py`; what comes back is plain values too.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any, BinaryIO

import docker
import docker.errors
import requests
import urllib3.exceptions
from docker.types import DeviceRequest, Mount

from envmgr.core import paths
from envmgr.core.errors import EngineError, EnvmgrError, Interrupted, UsageError
from envmgr.core.gpu import GpuRequest
from envmgr.door.containers import ContainerResult, ContainerSpec, GpuDevices, gpu_devices
from envmgr.door.logs import LineSplitter

ENGINE_HINT = ("start it with `sudo systemctl start docker`, or `sudo dockerd &` where there is no systemd; "
               "`envmgr doctor` shows what envmgr sees")
NVIDIA_HINT = ("this engine has no NVIDIA runtime: install the NVIDIA Container Toolkit on the host "
               "(and restart the engine), or run on the CPU with `--gpus none`")


class ImageGone(EngineError):
    """The image is not in the engine (another process removed it between two calls)."""


class EngineGone(EngineError):
    """The engine stopped answering while a container ran (stopped, restarted, its socket gone). The container
    may be left in the engine: `container` names it, for whoever settles the run once the engine is back."""

    def __init__(self, message: str, container: str, **kwargs: Any):
        super().__init__(message, **kwargs)
        self.container = container


# what a dropped engine connection looks like, mid-stream or on the next call
_DROPPED = (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError,
            urllib3.exceptions.ProtocolError, ConnectionError)


class _Shrunk(Exception):
    """A file sent by `load_files` had fewer bytes than the archive said."""


class PushPullRefused(EngineError):
    """The engine refused a push or a pull (the registry's answer, usually), as opposed to not answering."""


class Engine:
    """The Docker Engine, through the SDK; every method answers in plain values or envmgr errors."""

    def __init__(self, url: str | None = None, timeout: int = 600):
        self.url = url
        try:
            if url:
                self._client = docker.DockerClient(base_url=url, timeout=timeout)
            else:
                self._client = docker.from_env(timeout=timeout)
            self._client.ping()
        except docker.errors.DockerException as exc:
            where = url or "the default socket (DOCKER_HOST or /var/run/docker.sock)"
            raise EngineError(f"Docker Engine not reachable at {where}: {_short(exc)}", hint=ENGINE_HINT) from None
        self._api = self._client.api

    # ------------------------------------------------------------------ the engine itself

    def version(self) -> dict[str, Any]:
        """The engine's version record (`Version`, `ApiVersion`, ...)."""
        return self._api.version()

    def architecture(self) -> str:
        """The engine's machine architecture as it names it (`x86_64`, `aarch64`)."""
        return self._api.info().get("Architecture", "")

    # ------------------------------------------------------------------ images

    def image_id(self, ref: str) -> str | None:
        try:
            return self._api.inspect_image(ref)["Id"]
        except docker.errors.ImageNotFound:
            return None
        except docker.errors.APIError as exc:
            raise EngineError(f"engine refused to inspect image {ref}: {_short(exc)}") from None

    def inspect_image(self, ref: str) -> dict[str, Any] | None:
        try:
            return self._api.inspect_image(ref)
        except docker.errors.ImageNotFound:
            return None

    def images(self, label: str | None = None, all_: bool = False) -> list[dict[str, Any]]:
        """Image summaries; with `label`, only images that carry it; with `all_`, intermediate ones too."""
        try:
            return self._api.images(all=all_, filters={"label": label} if label else None)
        except docker.errors.APIError as exc:
            raise EngineError(f"engine refused to list images: {_short(exc)}") from None

    def image_history(self, image_id: str) -> list[dict[str, Any]] | None:
        """The image's history, newest first; None when the engine cannot tell."""
        try:
            return self._api.history(image_id)
        except docker.errors.APIError:
            return None

    def image_disk_usage(self) -> list[dict[str, Any]]:
        """The engine's own size figures per image (`Size`, `SharedSize`)."""
        return self._api.df().get("Images") or []

    def load_archive(self, archive: Iterable[bytes] | BinaryIO) -> list[str]:
        """Load a docker-archive; returns the image IDs / tags the engine reports."""
        loaded = []
        try:
            for chunk in self._api.load_image(archive):
                for line in _json_lines(chunk):
                    if "error" in line:
                        raise EngineError(f"engine refused the image archive: {line['error']}")
                    stream = line.get("stream", "")
                    if "Loaded image" in stream:
                        loaded.append(stream.split(":", 1)[1].strip())
        except docker.errors.APIError as exc:
            raise EngineError(f"engine refused the image archive: {_short(exc)}") from None
        return loaded

    def can_send_files(self) -> bool:
        """Whether `load_files` can reach this engine (a local unix socket)."""
        return self._socket_path() is not None

    def _socket_path(self) -> str | None:
        from docker.transport import UnixHTTPAdapter

        adapter = getattr(self._api, "_custom_adapter", None)
        return getattr(adapter, "socket_path", None) if isinstance(adapter, UnixHTTPAdapter) else None

    def load_files(self, pieces: Iterable[bytes | tuple[Any, int]], length: int,
                   progress: Callable[[int], None] | None = None) -> list[str]:
        """Load a docker-archive given as pieces (header bytes, and (path, size) of file contents), `length`
        bytes in all: one POST on the engine's unix socket whose file contents go by sendfile(2), so they
        never pass through Python (the engine's own load is then the cost). Same answers as `load_archive`."""
        import http.client
        import socket

        path = self._socket_path()
        if path is None:
            raise EngineError("loading from files needs the engine's unix socket")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self._api.timeout)   # as the SDK's calls: a silent engine fails, never hangs the build
        try:
            sock.connect(path)
            sock.sendall((f"POST /v{self._api._version}/images/load?quiet=1 HTTP/1.1\r\nHost: docker\r\n"
                          f"Content-Type: application/x-tar\r\nContent-Length: {length}\r\n"
                          "Connection: close\r\n\r\n").encode())
            sent = 0
            try:
                for piece in pieces:
                    if isinstance(piece, bytes):
                        sock.sendall(piece)
                        sent += len(piece)
                        continue
                    file, size = piece
                    with open(file, "rb") as fh:
                        if sock.sendfile(fh, 0, size) != size:
                            raise _Shrunk(f"{file}: shorter than its {size} bytes (changed while it was sent)")
                    sent += size
                    if progress:
                        progress(size)
            except BrokenPipeError:
                pass   # the engine stopped reading: its answer says why
            response = http.client.HTTPResponse(sock)
            response.begin()
            body = response.read()
        except _Shrunk as exc:
            raise EnvmgrError(f"the image's files changed while they were sent to the engine: {exc}",
                              hint="build again; nothing was tagged") from None
        except (OSError, http.client.HTTPException) as exc:   # connection refused or dropped, timed out
            raise EngineError(f"engine refused the image archive: {_short(exc)}", hint=ENGINE_HINT) from None
        finally:
            sock.close()
        if response.status != 200:
            message = body.decode("utf-8", errors="replace")
            with contextlib.suppress(ValueError, AttributeError):
                message = json.loads(message).get("message", message)
            raise EngineError(f"engine refused the image archive: {_short(Exception(message))}")
        if sent != length:
            raise EngineError(f"engine refused the image archive: {sent} of {length} bytes sent")
        loaded = []
        for line in _json_lines(body):
            if "error" in line:
                raise EngineError(f"engine refused the image archive: {line['error']}")
            stream = line.get("stream", "")
            if "Loaded image" in stream:
                loaded.append(stream.split(":", 1)[1].strip())
        return loaded

    def save_image(self, ref: str) -> Iterator[bytes]:
        """The image as a docker-archive, streamed (`docker save`)."""
        try:
            yield from self._api.get_image(ref)
        except docker.errors.ImageNotFound:
            raise EngineError(f"no image {ref} in the engine") from None
        except docker.errors.APIError as exc:
            raise EngineError(f"engine refused to save image {ref}: {_short(exc)}") from None

    def present_layers(self, diff_ids: list[str]) -> frozenset[str]:
        """The longest prefix of `diff_ids` whose layer chain some envmgr image in the engine has."""
        best: list[str] = []
        for summary in self._api.images(filters={"label": paths.LABEL_MANAGED}):
            layers = (self._api.inspect_image(summary["Id"]).get("RootFS") or {}).get("Layers") or []
            common = 0
            while common < min(len(layers), len(diff_ids)) and layers[common] == diff_ids[common]:
                common += 1
            if common > len(best):
                best = diff_ids[:common]
        return frozenset(best)

    def tag(self, image_id: str, repository: str, tag: str) -> None:
        """Name an image; ImageGone when it is not (or no longer) in the engine."""
        try:
            self._api.tag(image_id, repository, tag, force=True)
        except docker.errors.ImageNotFound:
            raise ImageGone(f"image {image_id[:19]} is not in the engine (removed meanwhile?)") from None
        except docker.errors.APIError as exc:
            raise EngineError(f"engine refused to tag {image_id[:19]} as {repository}:{tag}: {_short(exc)}") from None

    def remove_image(self, ref: str) -> None:
        """Remove an image or one of its tags (never by force: an image in use stays); gone already is fine,
        a refusal raises EngineError."""
        try:
            self._api.remove_image(ref)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            raise EngineError(_short(exc)) from None

    def push(self, repository: str, tag: str, auth: dict[str, str] | None) -> Iterator[dict[str, Any]]:
        """Push `repository:tag`; yields the engine's progress records. A refusal raises PushPullRefused."""
        return self._stream(lambda: self._api.push(repository, tag=tag, stream=True, decode=True, auth_config=auth))

    def pull(self, repository: str, tag: str, auth: dict[str, str] | None) -> Iterator[dict[str, Any]]:
        """Pull `repository:tag`; yields the engine's progress records. A refusal raises PushPullRefused."""
        return self._stream(lambda: self._api.pull(repository, tag=tag, stream=True, decode=True, auth_config=auth))

    @staticmethod
    def _stream(start: Callable[[], Iterable[dict[str, Any]]]) -> Iterator[dict[str, Any]]:
        try:
            yield from start()
        except docker.errors.APIError as exc:
            raise PushPullRefused(_short(exc)) from None

    def registry_has(self, reference: str) -> bool:
        """Whether the registry of `reference` (host[:port]/repo:tag) answers for it (asked through the engine)."""
        try:
            self._api.inspect_distribution(reference)
            return True
        except docker.errors.APIError:
            return False

    def has_nvidia_runtime(self) -> bool:
        """A registered `nvidia` runtime (the quick answer; `gpus_work` is the sure one)."""
        return "nvidia" in (self._api.info().get("Runtimes") or {})

    def gpus_work(self, image: str, requests: list[GpuDevices]) -> bool:
        """Whether the engine can hand these GPUs to a container.

        `--gpus` works through the NVIDIA Container Toolkit's hook even when no `nvidia` runtime is
        registered, so when none is, a throw-away container of `image` running `true` asks.
        """
        if self.has_nvidia_runtime():
            return True
        container_id = None
        try:
            hc = self._api.create_host_config(device_requests=_device_requests(requests), network_mode="none")
            container_id = self._api.create_container(image, ["true"], host_config=hc,
                                                      labels={paths.LABEL_MANAGED: "true",
                                                              paths.LABEL_KIND: "gpu-probe"})["Id"]
            self._api.start(container_id)
            self._api.wait(container_id, timeout=120)
            return True
        except docker.errors.APIError as exc:
            if "could not select device driver" in str(exc):
                return False
            raise EngineError(f"engine refused a GPU probe container: {_short(exc)}") from None
        finally:
            if container_id:
                with contextlib.suppress(Exception):
                    self._api.remove_container(container_id, force=True)

    # ------------------------------------------------------------------ containers

    def run(self, spec: ContainerSpec, on_line: Callable[[str], None] | None = None,
            on_start: Callable[[str], None] | None = None,
            on_partial: Callable[[str], None] | None = None) -> ContainerResult:
        """Create, start and follow a container; it is removed however this ends. Returns how it ended.

        `on_partial` sees the newest carriage-return segment of a line still being written (tqdm)."""
        name = spec.name or f"envmgr-{uuid.uuid4().hex[:12]}"
        kwargs: dict[str, Any] = dict(
            image=spec.image, command=spec.command, environment=spec.env, working_dir=spec.workdir,
            user=spec.user, labels={paths.LABEL_MANAGED: "true", **spec.labels}, name=name,
        )
        host_config = dict(
            mounts=[Mount(target=m.target, source=str(m.source), type="bind", read_only=m.read_only)
                    for m in spec.mounts],
            network_mode=spec.network, auto_remove=False, init=True,
            shm_size=spec.shm_size, device_requests=_device_requests(spec.device_requests) or None,
            cap_drop=spec.cap_drop or None, cap_add=spec.cap_add or None, security_opt=spec.security_opt or None,
            read_only=spec.read_only or None, tmpfs=spec.tmpfs or None, pids_limit=spec.pids_limit,
            mem_limit=spec.mem_limit,
        )
        container_id = None
        try:
            hc = self._api.create_host_config(**{k: v for k, v in host_config.items() if v is not None})
            created = self._api.create_container(host_config=hc, **kwargs)
            container_id = created["Id"]
            # The log stream holds a line back until its newline; attached before start, the container's
            # output arrives as written, so a tqdm bar redrawn with carriage returns can be shown live.
            attached = (self._api.attach(container_id, stdout=True, stderr=True, stream=True, logs=False)
                        if on_partial else None)
            try:
                self._api.start(container_id)
            except docker.errors.APIError as exc:
                if "could not select device driver" in str(exc) and "gpu" in str(exc):
                    raise UsageError(f"cannot give the container GPUs: {NVIDIA_HINT}") from None
                raise EngineError(f"engine could not start the container: {_short(exc)}") from None
            if on_start:
                on_start(container_id)
            self._follow(container_id, on_line, on_partial, attached)
            result = self._api.wait(container_id)
            oom_killed = bool(self._api.inspect_container(container_id)["State"].get("OOMKilled"))
            return ContainerResult(exit_code=int(result.get("StatusCode", 1)), oom_killed=oom_killed)
        except KeyboardInterrupt:
            if container_id is None:  # interrupted while the engine created it: find it by its name
                with contextlib.suppress(Exception):
                    container_id = self._api.inspect_container(name)["Id"]
            if container_id:
                with contextlib.suppress(Exception):
                    self._api.stop(container_id, timeout=spec.stop_timeout)
            raise Interrupted("interrupted") from None
        except docker.errors.ImageNotFound as exc:
            raise EngineError(f"image not found in the engine: {_short(exc)}") from None
        except docker.errors.APIError as exc:
            raise EngineError(f"engine error: {_short(exc)}") from None
        except _DROPPED:
            if container_id is None:
                raise EngineError("the Docker Engine stopped answering before the container started",
                                  hint=ENGINE_HINT) from None
            raise EngineGone("the Docker Engine stopped answering while the container ran", name,
                             hint=ENGINE_HINT) from None
        finally:
            if container_id:
                with contextlib.suppress(Exception):
                    self._api.remove_container(container_id, force=True)

    def _follow(self, container_id: str, on_line: Callable[[str], None] | None,
                on_partial: Callable[[str], None] | None = None, attached: Iterator[bytes] | None = None) -> None:
        splitter = LineSplitter()
        chunks = attached if attached is not None else self._api.logs(container_id, stream=True, follow=True,
                                                                       stdout=True, stderr=True)
        stream = iter(chunks)
        while True:
            try:
                chunk = next(stream)
            except StopIteration:
                break
            except (*_DROPPED, OSError) as exc:   # only the stream's own read: a callback's error is its own
                raise requests.exceptions.ConnectionError(str(exc)) from None
            for line in splitter.feed(chunk):
                if on_line:
                    on_line(line)
            if on_partial and b"\r" in chunk:
                segment = splitter.pending()
                if segment:
                    on_partial(segment)
        for line in splitter.close():
            if on_line:
                on_line(line)

    def container_state(self, name: str) -> dict[str, Any] | None:
        """`{"running": bool, "exit_code": int | None, "oom_killed": bool}` of a container, or None."""
        try:
            state = self._api.inspect_container(name)["State"]
        except docker.errors.NotFound:
            return None
        except docker.errors.APIError as exc:
            raise EngineError(f"engine refused to inspect container {name}: {_short(exc)}") from None
        running = bool(state.get("Running"))
        return {"running": running, "exit_code": None if running else state.get("ExitCode"),
                "oom_killed": bool(state.get("OOMKilled"))}

    def stop_container(self, name: str, timeout: int = 30) -> None:
        """Stop a container (SIGTERM, then SIGKILL after `timeout` s); gone already is fine."""
        with contextlib.suppress(docker.errors.NotFound):
            try:
                self._api.stop(name, timeout=timeout)
            except docker.errors.APIError as exc:
                raise EngineError(f"engine refused to stop container {name}: {_short(exc)}") from None

    def containers(self, label: str | None = None) -> list[dict[str, Any]]:
        """Container summaries, stopped ones too; with `label`, only those that carry it."""
        return self._api.containers(all=True, filters={"label": label} if label else None)

    def remove_container(self, container_id: str, force: bool = False) -> None:
        """Remove a stopped container (any, with `force`); gone already is fine, a refusal raises EngineError."""
        try:
            self._api.remove_container(container_id, force=force)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            raise EngineError(_short(exc)) from None


def gpu_device_requests(gpus: GpuRequest | str) -> list[DeviceRequest]:
    """What `--gpus` asked for (gpu.parse_gpus) -> Engine device requests."""
    return _device_requests(gpu_devices(gpus))


def _device_requests(requests: list[GpuDevices]) -> list[DeviceRequest]:
    return [DeviceRequest(count=r.count, capabilities=[["gpu"]]) if r.count is not None
            else DeviceRequest(device_ids=list(r.device_ids), capabilities=[["gpu"]]) for r in requests]


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

