"""Site configuration and mirrors: where packages come from (never what is installed).

Layers, lowest priority first: /etc/envmgr/config.toml < ~/.config/envmgr/config.toml <
ENVMGR_* variables < command-line flags. A mirror that no layer sets is inherited from the
host's own pip configuration, apt sources and CA bundle, so envmgr works on a machine that is
already set up for its mirrors without naming any index.
"""

from __future__ import annotations

import configparser
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from envmgr.core import paths
from envmgr.core.credentials import credentials_in
from envmgr.core.errors import UsageError
from envmgr.core.tomlfile import describe_validation_error, read_toml


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MirrorsConfig(_Strict):
    pypi: str | None = None                   # PEP 503 index used instead of the default index
    extra_indexes: list[str] = []
    find_links: list[str] = []
    apt: str | None = None                    # Debian mirror for base images
    ca_bundle: str | None = None
    http_proxy: str | None = None
    https_proxy: str | None = None
    no_proxy: str | None = None
    channels: dict[str, str] = {}             # conda channel name or URL -> mirror URL
    sources: dict[str, str] = {}              # a method's named index (e.g. "pytorch") -> mirror URL or "default"


class EngineConfig(_Strict):
    url: str | None = None                    # default: DOCKER_HOST or the local socket


class RunConfig(_Strict):
    """How method containers run: least privilege unless the site says otherwise."""

    run_as: str = "65534:65534"               # uid:gid a method runs as when envmgr is invoked as root
    pids_limit: int = 4096                    # processes a run container may have (data loader workers included)
    memory: str | None = None                 # memory limit of a run container, e.g. "64g" (default: 7/8 of RAM)
    shm_size: str | None = None               # its /dev/shm (default: 1/4 of RAM, at most 16g and the memory limit)
    tmp_size: str | None = None               # its tmpfs /tmp (default: 1/4 of the memory limit, at most 8g)

    @field_validator("run_as")
    @classmethod
    def _run_as(cls, value: str) -> str:
        if not re.fullmatch(r"\d+:\d+", value.strip()):
            raise ValueError("expected numeric uid:gid, e.g. 65534:65534")
        return value.strip()

    @field_validator("pids_limit")
    @classmethod
    def _pids_limit(cls, value: int) -> int:
        if value < 64:
            raise ValueError("at least 64 (data loaders start many processes)")
        return value


class TrustConfig(_Strict):
    keys: list[str] = []                      # public keys (paths) whose signatures import and pull accept
    require_signature: bool = False           # refuse archives and images no trusted key signed


class SiteConfig(_Strict):
    base_dir: Path | None = None
    cache_dir: Path | None = None
    mirrors: MirrorsConfig = MirrorsConfig()
    engine: EngineConfig = EngineConfig()
    run: RunConfig = RunConfig()
    trust: TrustConfig = TrustConfig()


@dataclass
class Setting:
    value: Any
    origin: str


@dataclass
class EffectiveConfig:
    """The merged configuration, with where each value came from (for `envmgr doctor`)."""

    base_dir: Path
    cache_dir: Path
    engine_url: str | None
    mirrors: MirrorsConfig
    origins: dict[str, str] = field(default_factory=dict)
    run: RunConfig = field(default_factory=RunConfig)
    trust: TrustConfig = field(default_factory=TrustConfig)

    def secrets(self) -> list[str]:
        """Every credential in any mirror value (whatever key it was typed under): redacted from all output."""
        found: list[str] = []
        for value in _strings(self.mirrors.model_dump()):
            found += credentials_in(value)
        return found


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings(v)]
    return []


# ---------------------------------------------------------------- inheritance from the host


def _pip_config_files() -> list[Path]:
    xdg_dirs = os.environ.get("XDG_CONFIG_DIRS", "/etc/xdg").split(":")
    files = [Path(d) / "pip" / "pip.conf" for d in xdg_dirs if d]
    files += [Path("/etc/pip.conf"), Path("~/.pip/pip.conf").expanduser(),
              Path(os.environ.get("XDG_CONFIG_HOME", "~/.config")).expanduser() / "pip" / "pip.conf"]
    if os.environ.get("PIP_CONFIG_FILE"):
        files.append(Path(os.environ["PIP_CONFIG_FILE"]))
    return files


def host_pip_settings() -> dict[str, Setting]:
    """index-url, extra-index-url, find-links and cert as the host's pip would see them."""
    found: dict[str, Setting] = {}
    for path in _pip_config_files():
        if not path.is_file():
            continue
        parser = configparser.RawConfigParser()
        try:
            parser.read(path)
        except configparser.Error:
            continue
        for section in ("global", "install"):
            if parser.has_section(section):
                for key in ("index-url", "extra-index-url", "find-links", "cert"):
                    if parser.has_option(section, key):
                        found[key] = Setting(parser.get(section, key), f"pip config {path} [{section}] {key}")
    for key in ("index-url", "extra-index-url", "find-links", "cert"):
        env = "PIP_" + key.upper().replace("-", "_")
        if os.environ.get(env):
            found[key] = Setting(os.environ[env], f"environment {env}")
    return found


def pip_default_index() -> Setting | None:
    """The index pip uses when nothing is configured, read from pip itself (so envmgr names none)."""
    try:
        from pip._internal.models.index import PyPI  # pip keeps its default here

        return Setting(PyPI.simple_url, "inherited: pip's built-in default index (nothing configured)")
    except Exception:  # noqa: BLE001 - no pip, or pip moved it: then there is no default to inherit
        return None


def _reachable_from_container(url: str) -> bool:
    return urlsplit(url).scheme in ("http", "https")


def host_apt_mirror(suite: str = "bookworm") -> Setting | None:
    """The host's Debian mirror for `suite` (deb822 .sources or one-line .list files)."""
    candidates: list[Path] = []
    if Path("/etc/apt/sources.list").is_file():
        candidates.append(Path("/etc/apt/sources.list"))
    source_dir = Path("/etc/apt/sources.list.d")
    if source_dir.is_dir():
        candidates += sorted(p for p in source_dir.iterdir() if p.suffix in (".list", ".sources"))
    for path in candidates:
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line:
                        continue
                    key, _, value = line.partition(":")
                    fields[key.strip().lower()] = value.strip()
                if ("deb" in fields.get("types", "").split() and suite in fields.get("suites", "").split()
                        and fields.get("enabled", "yes").lower() != "no"):
                    uri = fields.get("uris", "").split()
                    if uri:
                        return Setting(uri[0], f"apt sources {path}")
        else:
            for line in text.splitlines():
                words = [w for w in line.split() if not w.startswith("[")]
                if len(words) >= 3 and words[0] == "deb" and words[2] == suite:
                    return Setting(words[1], f"apt sources {path}")
    return None


def host_ca_bundle(pip: dict[str, Setting]) -> Setting | None:
    if "cert" in pip and Path(pip["cert"].value).is_file():
        return pip["cert"]
    for env in ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "CURL_CA_BUNDLE"):
        value = os.environ.get(env)
        if value and Path(value).is_file():
            return Setting(value, f"environment {env}")
    default = Path("/etc/ssl/certs/ca-certificates.crt")
    if default.is_file():
        return Setting(str(default), "host default CA bundle")
    return None


# ---------------------------------------------------------------- layering


_LIST_KEYS = {"extra_indexes", "find_links", "keys"}


def _env_layer() -> tuple[dict[str, Any], dict[str, str]]:
    """ENVMGR_BASE_DIR, ENVMGR_MIRRORS_PYPI, ENVMGR_ENGINE_URL, ... (lists: comma or space separated)."""
    data: dict[str, Any] = {}
    names: dict[str, str] = {}
    for key in ("base_dir", "cache_dir"):
        env = paths.ENV_PREFIX + key.upper()
        if os.environ.get(env):
            data[key] = os.environ[env]
            names[key] = env
    for section, model in (("mirrors", MirrorsConfig), ("engine", EngineConfig), ("run", RunConfig),
                           ("trust", TrustConfig)):
        for key, info in model.model_fields.items():
            if info.annotation in (dict[str, str],):
                continue
            env = f"{paths.ENV_PREFIX}{section.upper()}_{key.upper()}"
            if os.environ.get(env):
                value: Any = os.environ[env]
                if key in _LIST_KEYS:
                    value = [v for v in re.split(r"[,\s]+", value) if v]
                data.setdefault(section, {})[key] = value
                names[f"{section}.{key}"] = env
    return data, names


def _merge(into: dict[str, Any], layer: dict[str, Any], origin: str, origins: dict[str, str], prefix=""):
    for key, value in layer.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and key in ("mirrors", "engine", "run", "trust"):
            _merge(into.setdefault(key, {}), value, origin, origins, prefix=f"{dotted}.")
        else:
            into[key] = value
            origins[dotted] = origin


def default_base_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/envmgr")
    return Path(os.environ.get("XDG_DATA_HOME", "~/.local/share")).expanduser() / "envmgr"


def load_config(flags: dict[str, Any] | None = None, *, inherit_host: bool = True,
                files: list[Path] | None = None) -> EffectiveConfig:
    """Merge every layer and validate. `flags` uses the file's shape ({"mirrors": {"pypi": ...}})."""
    site, origins = _site_config(flags, files)
    mirrors = site.mirrors.model_copy()
    if inherit_host:
        _inherit_host_mirrors(mirrors, origins)

    base_dir = (site.base_dir or default_base_dir()).expanduser()
    origins.setdefault("base_dir", "default")
    cache_dir = (site.cache_dir or base_dir / "cache").expanduser()
    origins.setdefault("cache_dir", "default (<base_dir>/cache)")
    engine_url = site.engine.url or os.environ.get("DOCKER_HOST")
    if not site.engine.url and os.environ.get("DOCKER_HOST"):
        origins["engine.url"] = "inherited: environment DOCKER_HOST"
    return EffectiveConfig(base_dir=base_dir, cache_dir=cache_dir, engine_url=engine_url,
                           mirrors=mirrors, origins=origins, run=site.run, trust=site.trust)


def _site_config(flags: dict[str, Any] | None, files: list[Path] | None) -> tuple[SiteConfig, dict[str, str]]:
    """Config files, then the environment, then flags, each over the one before; with where each key came
    from. Each file is validated alone first, so an error names the file that holds it."""
    merged: dict[str, Any] = {}
    origins: dict[str, str] = {}
    config_files = files if files is not None else [paths.SYSTEM_CONFIG, paths.USER_CONFIG.expanduser()]
    if files is None and os.environ.get("ENVMGR_CONFIG"):
        config_files = [*config_files, Path(os.environ["ENVMGR_CONFIG"])]
    for path in config_files:
        if not path.is_file():
            continue
        layer = read_toml(path)
        try:
            SiteConfig.model_validate(layer)
        except ValidationError as exc:
            raise UsageError(describe_validation_error(path, exc)) from None
        _merge(merged, layer, f"config {path}", origins)
    env_data, env_names = _env_layer()
    env_origins: dict[str, str] = {}
    _merge(merged, env_data, "environment", env_origins)
    for dotted in env_origins:
        origins[dotted] = f"environment {env_names[dotted]}"
    if flags:
        _merge(merged, flags, "command-line flag", origins)
    try:
        return SiteConfig.model_validate(merged), origins
    except ValidationError as exc:
        raise UsageError(describe_validation_error("configuration (environment or flags)", exc)) from None


def _inherit_host_mirrors(mirrors: MirrorsConfig, origins: dict[str, str]) -> None:
    """What the site config leaves unset, taken from the host (pip's config, CA bundle, apt sources, proxy
    variables), in place, each origin marked "inherited"."""
    pip = host_pip_settings()
    _inherit_pip_indexes(mirrors, origins, pip)
    if mirrors.ca_bundle is None:
        ca = host_ca_bundle(pip)
        if ca:
            mirrors.ca_bundle = ca.value
            origins["mirrors.ca_bundle"] = "inherited: " + ca.origin
    if mirrors.apt is None:
        apt = host_apt_mirror()
        if apt:
            mirrors.apt = apt.value
            origins["mirrors.apt"] = "inherited: " + apt.origin
    _inherit_proxies(mirrors, origins)


def _inherit_pip_indexes(mirrors: MirrorsConfig, origins: dict[str, str], pip: dict[str, Setting]) -> None:
    """pip's index-url, extra-index-url and find-links, only http(s) ones (a container cannot read host paths)."""
    if mirrors.pypi is None and "index-url" in pip and _reachable_from_container(pip["index-url"].value):
        mirrors.pypi = pip["index-url"].value
        origins["mirrors.pypi"] = "inherited: " + pip["index-url"].origin
    elif mirrors.pypi is None and (default := pip_default_index()):
        # poetry needs an index it can read through the simple API (see backends/poetry.py)
        mirrors.pypi = default.value
        origins["mirrors.pypi"] = default.origin
    if "mirrors.extra_indexes" not in origins and "extra-index-url" in pip:
        urls = [u for u in pip["extra-index-url"].value.split() if _reachable_from_container(u)]
        if urls:
            mirrors.extra_indexes = urls
            origins["mirrors.extra_indexes"] = "inherited: " + pip["extra-index-url"].origin
    if "mirrors.find_links" not in origins and "find-links" in pip:
        urls = [u for u in pip["find-links"].value.split() if _reachable_from_container(u)]
        if urls:
            mirrors.find_links = urls
            origins["mirrors.find_links"] = "inherited: " + pip["find-links"].origin


def _inherit_proxies(mirrors: MirrorsConfig, origins: dict[str, str]) -> None:
    """http_proxy, https_proxy, no_proxy from the environment (upper case first) where the config has none."""
    for key, env_names in (("http_proxy", ("HTTP_PROXY", "http_proxy")),
                           ("https_proxy", ("HTTPS_PROXY", "https_proxy")),
                           ("no_proxy", ("NO_PROXY", "no_proxy"))):
        if getattr(mirrors, key) is None:
            for env in env_names:
                if os.environ.get(env):
                    setattr(mirrors, key, os.environ[env])
                    origins[f"mirrors.{key}"] = f"inherited: environment {env}"
                    break
