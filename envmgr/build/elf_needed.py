"""Which shared libraries an installed environment needs that nothing in its image provides.

Runs inside a container of the built image (`python3 -S -c <this file> PREFIX`), so it imports the
standard library only. It reads each `*.so*` file's dynamic section (DT_NEEDED, DT_SONAME, DT_RPATH,
DT_RUNPATH) itself — a few dozen lines of `struct` rather than a dependency in every image — and prints
one line: `ENVMGR-MISSING {"needed": {"soname": ["file that needs it", ...]}, "optional": {...}}`.

A soname counts as provided when a file of that name (or a library whose DT_SONAME it is) is anywhere in
the environment (wheels bundle theirs in `<pkg>.libs/`, torch finds the nvidia wheels' by RPATH), in the
image's library folders (base and system layer: /lib, /usr/lib, their multiarch folders, ld.so.conf's),
or in a folder its RPATH/RUNPATH names ($ORIGIN expanded). The NVIDIA driver's own libraries are mounted
at run time by the container toolkit and never count as missing.
"""

from __future__ import annotations

import json
import os
import struct
import sys

PT_LOAD, PT_DYNAMIC = 1, 2
DT_NULL, DT_NEEDED, DT_STRTAB, DT_SONAME, DT_RPATH, DT_RUNPATH = 0, 1, 5, 14, 15, 29
# libraries the NVIDIA driver brings at run time (the container toolkit mounts them into the container)
DRIVER_PREFIXES = ("libcuda.so", "libnvidia-", "libnvcuvid.so", "libnvoptix.so", "libcudadebugger.so",
                   "libGLX_nvidia.so", "libEGL_nvidia.so", "libGLESv2_nvidia.so", "libGLESv1_CM_nvidia.so")
SYSTEM_DIRS = ("/lib", "/usr/lib", "/lib64", "/usr/lib64", "/usr/local/lib")


def dynamic_info(path: str) -> tuple[list[str], str | None, list[str]] | None:
    """(DT_NEEDED names, DT_SONAME, RPATH + RUNPATH entries) of an ELF file, or None when it is not one."""
    try:
        with open(path, "rb") as fh:
            return _read(fh)
    except (OSError, struct.error, ValueError, IndexError):
        return None


def _read(fh) -> tuple[list[str], str | None, list[str]] | None:
    ident = fh.read(16)
    if len(ident) < 16 or ident[:4] != b"\x7fELF" or ident[4] not in (1, 2) or ident[5] not in (1, 2):
        return None
    wide, end = ident[4] == 2, "<" if ident[5] == 1 else ">"
    layout = end + ("HHIQQQIHHH" if wide else "HHIIIIIHHH")
    fields = struct.unpack(layout, fh.read(struct.calcsize(layout)))
    phoff, phentsize, phnum = fields[4], fields[8], fields[9]
    loads, dynamic = [], None
    for i in range(phnum):
        fh.seek(phoff + i * phentsize)
        if wide:
            p_type, _, offset, vaddr, _, filesz, _, _ = struct.unpack(end + "IIQQQQQQ", fh.read(56))
        else:
            p_type, offset, vaddr, _, filesz, _, _, _ = struct.unpack(end + "IIIIIIII", fh.read(32))
        if p_type == PT_LOAD:
            loads.append((vaddr, offset, filesz))
        elif p_type == PT_DYNAMIC:
            dynamic = (offset, filesz)
    if dynamic is None:
        return [], None, []
    entry = struct.Struct(end + ("qQ" if wide else "iI"))
    fh.seek(dynamic[0])
    raw = fh.read(dynamic[1])
    tags: list[tuple[int, int]] = []
    for pos in range(0, len(raw) - entry.size + 1, entry.size):
        tag, value = entry.unpack_from(raw, pos)
        if tag == DT_NULL:
            break
        tags.append((tag, value))
    strtab = next((v for t, v in tags if t == DT_STRTAB), None)
    base = next((off + strtab - va for va, off, size in loads if strtab is not None and va <= strtab < va + size),
                None)
    if base is None:
        return [], None, []

    def string(at: int) -> str:
        fh.seek(base + at)
        data = fh.read(4096)
        return data[:data.index(b"\0")].decode("utf-8", "replace")

    needed = [string(v) for t, v in tags if t == DT_NEEDED]
    soname = next((string(v) for t, v in tags if t == DT_SONAME), None)
    search = [d for t, v in tags if t in (DT_RPATH, DT_RUNPATH) for d in string(v).split(":") if d]
    return needed, soname, search


def is_driver_library(name: str) -> bool:
    return name.startswith(DRIVER_PREFIXES)


def _library_dirs() -> list[str]:
    dirs = list(SYSTEM_DIRS)
    for top in ("/lib", "/usr/lib"):
        try:
            dirs += [os.path.join(top, d) for d in sorted(os.listdir(top)) if d.endswith("-linux-gnu")]
        except OSError:
            pass
    try:
        confs = sorted(os.listdir("/etc/ld.so.conf.d"))
    except OSError:
        confs = []
    for conf in confs:
        try:
            with open(os.path.join("/etc/ld.so.conf.d", conf)) as fh:
                dirs += [line.strip() for line in fh if line.strip().startswith("/")]
        except OSError:
            pass
    return dirs


def _names_in(folder: str) -> set[str]:
    try:
        return set(os.listdir(folder))
    except OSError:
        return set()


def is_extension_module(name: str) -> bool:
    """What Python imports: `*.so` that is not a `lib*` library (`_C.cpython-311-x86_64-linux-gnu.so`,
    `cv2.abi3.so`, `_gl.so`). Versioned `*.so.N` files and `lib*.so` are libraries or plugins."""
    return name.endswith(".so") and (not name.startswith("lib") or ".cpython-" in name or name.endswith(".abi3.so"))


def missing(prefix: str, system_dirs: list[str] | None = None) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(needed, optional): soname -> the files under `prefix` that need it, for each soname nothing here
    provides. `needed` counts what an extension module loads, directly or through the environment's own
    libraries; `optional` what only plugins need that no extension module links (NVIDIA's nvshmem and
    cuFile RDMA transports, Qt platform plugins): they are loaded on demand, if ever."""
    root = os.path.realpath(prefix)
    system: set[str] = set()
    for folder in _library_dirs() if system_dirs is None else system_dirs:
        system |= _names_in(folder)
    elf: dict[str, tuple[list[str], str | None, list[str]]] = {}
    names: set[str] = set()
    for folder, _dirs, files in os.walk(root):
        for name in files:
            names.add(name)
            if ".so" not in name:
                continue
            path = os.path.join(folder, name)
            info = None if os.path.islink(path) else dynamic_info(path)
            if info is not None:
                elf[os.path.relpath(path, root)] = info
    return decide(root, elf, names, system, os.path.exists)


def decide(root: str, elf: dict, names: set[str], system: set[str], exists) -> tuple[dict[str, list[str]],
                                                                                    dict[str, list[str]]]:
    """missing()'s answer from facts alone: `elf` (path under `root` -> DT_NEEDED, DT_SONAME, RPATH/RUNPATH of
    each ELF file), `names` (every file name in the environment), `system` (every name in the image's library
    folders) and `exists` (whether an absolute path is a file in the image). The build answers it from the
    layer store's records without a container; the scan above from the files themselves."""
    found: dict[str, tuple[list[str], list[str]]] = {}
    provided: dict[str, list[str]] = {}      # file name or SONAME -> the environment's files of that name
    for rel, (needed, soname, search) in sorted(elf.items()):
        folder = os.path.dirname(os.path.join(root, rel))
        for key in {os.path.basename(rel), soname} - {None}:
            provided.setdefault(str(key), []).append(rel)
        dirs = [d.replace("$ORIGIN", folder).replace("${ORIGIN}", folder) for d in search]
        found[rel] = (list(needed), dirs)
    reached, todo = set(), sorted(rel for rel in found if is_extension_module(os.path.basename(rel)))
    while todo:     # what importing the extension modules loads
        rel = todo.pop()
        if rel in reached:
            continue
        reached.add(rel)
        todo += [dep for soname in found[rel][0] for dep in provided.get(soname, []) if dep in found]
    needed_by: dict[str, list[str]] = {}
    optional: dict[str, list[str]] = {}
    for rel, (needed, dirs) in sorted(found.items()):
        for soname in needed:
            if soname in provided or soname in names or soname in system or is_driver_library(soname) or "/" in soname:
                continue
            if any(exists(os.path.join(d, soname)) for d in dirs):
                continue
            (needed_by if rel in reached else optional).setdefault(soname, []).append(rel)
    return needed_by, {soname: files for soname, files in optional.items() if soname not in needed_by}


if __name__ == "__main__":
    needed, optional = missing(sys.argv[1])
    print("ENVMGR-MISSING " + json.dumps({"needed": needed, "optional": optional}, sort_keys=True), flush=True)
