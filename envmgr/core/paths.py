"""One source of truth for paths, variable names and label keys shared by envmgr's modules.

Container-side paths are part of the contract with the methods (see envs/sd-demo/README.md).
"""

from __future__ import annotations

from pathlib import Path

# The built-in methods (the repository's envs/) and base image definitions (its images/). An installed
# wheel carries them as package data under envmgr/_builtin/ (setup.py copies them there at build time);
# a checkout (an editable install) reads them where they are. builtin_dir() is the one place that decides.
PACKAGE_DIR = Path(__file__).resolve().parent.parent   # envmgr/ (this file is envmgr/core/paths.py)
BUILTIN_PACKAGE_DATA = PACKAGE_DIR / "_builtin"


def _checkout_root() -> Path | None:
    """The repository envmgr runs from, when it runs from one (its pyproject names envmgr): else None."""
    root = PACKAGE_DIR.parent
    pyproject = root / "pyproject.toml"
    try:
        if pyproject.is_file() and 'name = "envmgr"' in pyproject.read_text():
            return root
    except OSError:
        pass
    return None


def builtin_dir(name: str) -> Path:
    """envs/ or images/: the installed package data first, else the checkout's folder.

    Never another package's top-level folder of the same name beside envmgr in site-packages.
    """
    installed = BUILTIN_PACKAGE_DATA / name
    if installed.is_dir():
        return installed
    root = _checkout_root()
    return root / name if root else installed


def builtin_origin(name: str) -> str:
    """Where builtin_dir(name) comes from, in words (for `envmgr doctor`)."""
    folder = builtin_dir(name)
    if not folder.is_dir():
        return f"none: {folder} is missing (a wheel built without its package data?)"
    where = "installed package data" if folder.is_relative_to(BUILTIN_PACKAGE_DATA) else "checkout"
    return f"{where}: {folder}"


BUILTIN_METHODS_DIR = builtin_dir("envs")
BASE_IMAGES_DIR = builtin_dir("images")

SPEC_FILE = "envmgr.toml"
VARIANTS_DIR = "variants"      # <lock_dir>/variants/<name>/: each variant's lock, beside the default one

# Site config layers, lowest priority first.
SYSTEM_CONFIG = Path("/etc/envmgr/config.toml")
USER_CONFIG = Path("~/.config/envmgr/config.toml")
ENV_PREFIX = "ENVMGR_"
# bytes of new layers per step of a stepped load (envmgr/build/load_steps.py); 0: the image as one archive
ENV_LOAD_STEP_BYTES = ENV_PREFIX + "LOAD_STEP_BYTES"

# Inside images and containers.
CONTAINER_ENVS_ROOT = "/opt/envmgr/envs"          # /opt/envmgr/envs/<method>: the locked environment
CONTAINER_METHOD_DIR = "/opt/envmgr/method"       # the method's own files
CONTAINER_TOOLS_DIR = "/opt/envmgr/tools"         # lock-time tools (poetry), never in an image
CONTAINER_UV = "/opt/envmgr/bin/uv"               # the host's pinned uv, mounted read-only at lock/build time
CONTAINER_CA_BUNDLE = "/opt/envmgr/ca-bundle.crt" # the site's CA bundle, mounted at lock/build time only
CONTAINER_NETRC = "/opt/envmgr/netrc"             # mirror credentials, mounted at lock/build time only
CONTAINER_WORK = "/opt/envmgr/work"
CONTAINER_CACHE = "/opt/envmgr/cache"
CONTAINER_MODELS = "/envmgr/models"
CONTAINER_DATA = "/envmgr/data"
CONTAINER_RUN = "/envmgr/run"
CONTAINER_RUN_METHOD = CONTAINER_RUN + "/method"   # workdir = "method": the run's writable copy of the method
CONTAINER_INPUTS = "/envmgr/inputs"               # `--input PATH[:NAME]`: read-only at /envmgr/inputs/NAME
CONTAINER_METHOD_INFO = "/etc/envmgr/method.json"

# Image labels (never a mirror URL).
LABEL_PREFIX = "org.envmgr."
LABEL_METHOD = LABEL_PREFIX + "method"
LABEL_INPUTS = LABEL_PREFIX + "inputs-hash"
LABEL_LOCK = LABEL_PREFIX + "lock-hash"
LABEL_SPEC = LABEL_PREFIX + "spec-hash"
LABEL_BASE = LABEL_PREFIX + "base"
LABEL_KIND = LABEL_PREFIX + "kind"   # "base" or "method"
LABEL_MANAGED = LABEL_PREFIX + "managed"
LABEL_VARIANT = LABEL_PREFIX + "variant"
# a chain-prefix image a stepped load leaves while it runs (envmgr/build/load_steps.py); its value: the image it builds
LABEL_PARTIAL = LABEL_PREFIX + "partial-of"
# GPU facts of a method image (envmgr/build/gpu_image.py): read from the lock, and from torch in the build
LABEL_TORCH = LABEL_PREFIX + "torch"                # torch version, e.g. 2.13.0
LABEL_CUDA = LABEL_PREFIX + "cuda"                  # CUDA runtime the environment ships, e.g. 13.0
LABEL_CUDNN = LABEL_PREFIX + "cudnn"                # cuDNN version, e.g. 9.20.0.48
LABEL_GPU_ARCHS = LABEL_PREFIX + "gpu-archs"        # torch.cuda.get_arch_list(), comma-separated
# What a method image's layers hold, as JSON (envmgr/build/layer_facts.py): reuse facts and SBOM facts (issue 26)
LABEL_LAYER_FACTS = LABEL_PREFIX + "layer-facts"

# What envmgr tells a container about the GPUs it asked for (`all`, `2`, `0,1`, or `none`).
ENV_GPUS = "ENVMGR_GPUS"

IMAGE_REPO_PREFIX = "envmgr/"
