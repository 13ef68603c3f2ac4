"""Where mirrors get applied: the site config turned into container environment and mounts.

Only lock and build containers receive these. Nothing here is ever written into a lock, an image
layer, a label or a log line (the Reporter redacts the credentials found in these URLs).
"""

from __future__ import annotations

from pathlib import Path

from envmgr.core import paths
from envmgr.core.config import MirrorsConfig
from envmgr.door.containers import BindMount


def ca_mounts(mirrors: MirrorsConfig) -> list[BindMount]:
    if mirrors.ca_bundle and Path(mirrors.ca_bundle).is_file():
        return [BindMount(Path(mirrors.ca_bundle).resolve(), paths.CONTAINER_CA_BUNDLE, read_only=True)]
    return []


def tls_env(mirrors: MirrorsConfig) -> dict[str, str]:
    env: dict[str, str] = {}
    if mirrors.ca_bundle and Path(mirrors.ca_bundle).is_file():
        for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "PIP_CERT", "CURL_CA_BUNDLE"):
            env[name] = paths.CONTAINER_CA_BUNDLE
    for key, names in (("http_proxy", ("HTTP_PROXY", "http_proxy")), ("https_proxy", ("HTTPS_PROXY", "https_proxy")),
                       ("no_proxy", ("NO_PROXY", "no_proxy"))):
        value = getattr(mirrors, key)
        if value:
            for name in names:
                env[name] = value
    return env


def uv_env(mirrors: MirrorsConfig) -> dict[str, str]:
    """uv's settings for the site's PyPI mirror, extra indexes and wheelhouses."""
    env = {"UV_NO_CONFIG": "1", "UV_PYTHON_DOWNLOADS": "never", "UV_LINK_MODE": "copy",
           "UV_NO_PROGRESS": "1", **tls_env(mirrors)}
    if mirrors.pypi:
        env["UV_DEFAULT_INDEX"] = mirrors.pypi
    if mirrors.extra_indexes:
        env["UV_INDEX"] = " ".join(mirrors.extra_indexes)
    if mirrors.find_links:
        env["UV_FIND_LINKS"] = ",".join(mirrors.find_links)
    return env


def poetry_env(mirrors: MirrorsConfig) -> dict[str, str]:
    """poetry's settings: the PyPI mirror goes through poetry-plugin-pypi-mirror, never into pyproject.toml."""
    env = {"POETRY_NO_INTERACTION": "1", "POETRY_VIRTUALENVS_CREATE": "false", **tls_env(mirrors)}
    if mirrors.pypi:
        env["POETRY_PYPI_MIRROR_URL"] = mirrors.pypi
    return env


def on_host(env: dict[str, str], mirrors: MirrorsConfig) -> dict[str, str]:
    """The same settings for a tool that runs on the host: the CA bundle at its host path."""
    return {key: (str(mirrors.ca_bundle) if value == paths.CONTAINER_CA_BUNDLE else value)
            for key, value in env.items()}


def conda_channel_mirrors(mirrors: MirrorsConfig) -> dict[str, str]:
    """Canonical channel URL -> mirror URL, from `[mirrors] channels` (keys: a channel name or URL).

    `$VAR` / `${VAR}` in a mirror URL come from the environment, so a credential can stay out of
    the config file. The canonical URL is what a lock records; the mirror is only ever fetched.
    """
    import os

    from rattler import Channel

    found = {}
    for channel, mirror in mirrors.channels.items():
        if mirror and mirror != "default":
            found[Channel(channel).base_url.rstrip("/")] = os.path.expandvars(mirror).rstrip("/")
    return found


def mirror_hosts(mirrors: MirrorsConfig) -> list[str]:
    """Host parts of every configured mirror: a lock that mentions one of these is rejected."""
    from urllib.parse import urlsplit

    hosts = []
    for url in [mirrors.pypi, *mirrors.extra_indexes, *mirrors.find_links, *mirrors.channels.values(),
                *mirrors.sources.values()]:
        if url and url != "default":
            parts = urlsplit(url)
            if parts.hostname:
                hosts.append(parts.netloc.rsplit("@", 1)[-1])
    return hosts
