"""`envmgr doctor`: the effective configuration with where each value came from, and what is missing."""

from __future__ import annotations

from dataclasses import dataclass

from envmgr.core import paths
from envmgr.core.config import EffectiveConfig
from envmgr.core.credentials import mask_url
from envmgr.core.errors import EngineError, Exit
from envmgr.door.context import Context
from envmgr.images.base import missing_tools


@dataclass(frozen=True)
class Setting:
    key: str
    value: str
    origin: str


@dataclass(frozen=True)
class Check:
    check: str
    status: str
    ok: bool


def settings(config: EffectiveConfig) -> list[Setting]:
    """Each setting envmgr uses, credentials masked, and the layer (file, variable, flag) it came from."""
    mirrors = config.mirrors
    rows = [
        ("base_dir", str(config.base_dir), config.origins.get("base_dir", "")),
        ("cache_dir", str(config.cache_dir), config.origins.get("cache_dir", "")),
        ("mirrors.pypi", mask_url(mirrors.pypi) or "(the installers' default index)",
         config.origins.get("mirrors.pypi", "nothing configured on the host or for envmgr")),
        ("mirrors.extra_indexes", ", ".join(mask_url(u) or "" for u in mirrors.extra_indexes) or "-",
         config.origins.get("mirrors.extra_indexes", "")),
        ("mirrors.find_links", ", ".join(mask_url(u) or "" for u in mirrors.find_links) or "-",
         config.origins.get("mirrors.find_links", "")),
        ("mirrors.apt", mask_url(mirrors.apt) or "-", config.origins.get("mirrors.apt", "")),
        ("mirrors.ca_bundle", mirrors.ca_bundle or "-", config.origins.get("mirrors.ca_bundle", "")),
        ("mirrors.https_proxy", mask_url(mirrors.https_proxy) or "-", config.origins.get("mirrors.https_proxy", "")),
        ("trust.keys", ", ".join(config.trust.keys) or "-", config.origins.get("trust.keys", "")),
        ("trust.require_signature", str(config.trust.require_signature).lower(),
         config.origins.get("trust.require_signature", "default")),
        ("run.run_as", config.run.run_as, config.origins.get("run.run_as", "default")),
    ]
    return [Setting(key, str(value), origin) for key, value, origin in rows]


def checks(ctx: Context) -> list[Check]:
    """The engine first (its failure decides the exit code), then the GPU runtime, Slurm and the base image tools."""
    found = []
    try:
        engine = ctx.engine
        version = engine.version()
        found.append(Check("engine", f"Docker Engine {version.get('Version')} (API {version.get('ApiVersion')})", True))
        found.append(Check("gpu runtime", "NVIDIA runtime registered" if engine.has_nvidia_runtime()
                           else "no nvidia runtime registered (a GPU run probes the engine first; GPUs need "
                                "the NVIDIA Container Toolkit)", True))
    except EngineError as exc:
        found.append(Check("engine", str(exc), False))
    from envmgr.runs.gpu_plan import doctor_row  # gpu_plan reads specs and host GPUs: only when doctor runs

    found.append(Check(*doctor_row(ctx)))
    from envmgr.runs.targets import TARGETS

    for target in TARGETS.values():   # e.g. Slurm answers? base dir shared? (only `--on slurm` needs it)
        found.extend(Check(*row) for row in target.doctor_checks(ctx.config.base_dir))
    for label, name in (("built-in methods", "envs"), ("base images", "images")):   # the wheel's data, or a checkout's
        found.append(Check(label, paths.builtin_origin(name), paths.builtin_dir(name).is_dir()))
    missing = missing_tools()
    found.append(Check("base image tools", "debuerreotype, debootstrap present" if not missing
                       else f"missing: {', '.join(missing)} (apt-get install debuerreotype debootstrap)", not missing))
    return found


def exit_code(found: list[Check]) -> Exit:
    """OK when every check passed; ENGINE when the engine did not answer; FAILED otherwise."""
    if all(check.ok for check in found):
        return Exit.OK
    return Exit.ENGINE if not found[0].ok else Exit.FAILED
