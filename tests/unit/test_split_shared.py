"""The split by RECORD (no engine): files several distributions claim, and installed files against their RECORD."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from envmgr.build.layers import SPLIT_ERROR, SPLIT_SCRIPT, Unit, plan_groups, record_digest, shared_files, shared_owners

SITE = "lib/python3.11/site-packages"


def _dist(prefix: Path, name: str, files: dict[str, bytes], *, unhashed: tuple[str, ...] = ()) -> dict[str, str]:
    """Install a fake distribution into `prefix`; paths are relative to site-packages ("../../../bin/x" too).

    Returns its RECORD hashes (path in the prefix -> hash)."""
    site = prefix / SITE
    info = site / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    rows, hashes = [], {}
    for rel, data in {**files, f"{info.name}/METADATA": (info / "METADATA").read_bytes()}.items():
        path = site / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        digest = "" if rel in unhashed else record_digest(data)
        rows.append(f"{rel},{digest},{len(data)}")
        hashes[str(path.resolve().relative_to(prefix.resolve()))] = digest
    rows.append(f"{info.name}/RECORD,,")
    (info / "RECORD").write_text("".join(row + "\n" for row in rows))
    return hashes


def _split(tmp: Path, units: dict[str, str], others: list[list[str]] = (), alone: str = "") -> subprocess.CompletedProcess:
    (tmp / "units.txt").write_text("".join(f"{key} {name}\n" for name, key in units.items()))
    (tmp / "skeleton").write_text("")
    (tmp / "others.jsonl").write_text("".join(json.dumps(row) + "\n" for row in others))
    (tmp / "bytecode").mkdir(exist_ok=True)
    (tmp / "split.py").write_text(SPLIT_SCRIPT)
    args = [sys.executable, "-S", "-B", str(tmp / "split.py"), str(tmp / "prefix"), str(tmp / "envs"),
            str(tmp / "units.txt"), str(tmp / "skeleton"), str(tmp / "bytecode" / "plan"), str(tmp / "others.jsonl")]
    return subprocess.run([*args, *([alone] if alone else [])], capture_output=True, text=True)


def _setup(tmp: Path) -> Path:
    (tmp / "envs").mkdir()
    return tmp / "prefix"


def test_owner_rule_is_the_first_name_in_byte_order_and_only_for_shared_paths():
    claims = {"nvidia/__init__.py": {"nvidia-nvtx-cu12": "h", "nvidia-cuda-runtime-cu12": "h", "nvidia-cublas-cu12": "h"},
              "bin/fastapi": {"fastapi-cli": "a", "fastapi": "b"},
              "alone.py": {"solo": "c"}}
    assert shared_owners(claims) == {"nvidia/__init__.py": "nvidia-cublas-cu12", "bin/fastapi": "fastapi"}
    # whatever the order the claims arrive in
    assert shared_owners({k: dict(reversed(list(v.items()))) for k, v in claims.items()}) == shared_owners(claims)


def test_a_namespace_init_two_wheels_ship_goes_into_one_tree_and_the_split_succeeds(tmp_path):
    prefix = _setup(tmp_path)
    _dist(prefix, "nvidia-nvtx-cu12", {"nvidia/__init__.py": b"", "nvidia/nvtx/lib.so": b"NVTX"})
    _dist(prefix, "nvidia-cuda-runtime-cu12", {"nvidia/__init__.py": b"", "nvidia/cuda_runtime/lib.so": b"RT"})
    proc = _split(tmp_path, {"nvidia-nvtx-cu12": "k-nvtx", "nvidia-cuda-runtime-cu12": "k-rt"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    envs = tmp_path / "envs"
    assert (envs / "d-k-rt" / SITE / "nvidia/__init__.py").is_file()          # "nvidia-cuda-..." < "nvidia-nvtx-..."
    assert not (envs / "d-k-nvtx" / SITE / "nvidia/__init__.py").exists()
    assert (envs / "d-k-nvtx" / SITE / "nvidia/nvtx/lib.so").read_bytes() == b"NVTX"
    # each unit's RECORD rows are left for the host, the shared path in both
    listed = json.loads((envs / "files-k-nvtx.json").read_text())
    assert listed["name"] == "nvidia-nvtx-cu12" and f"{SITE}/nvidia/__init__.py" in [f[0] for f in listed["files"]]
    assert listed["record"].startswith("sha256=")
    # the non-owner compiles nothing it does not hold
    plan = (tmp_path / "bytecode" / "plan").read_text()
    nvtx_lists = [line.split()[1] for line in plan.splitlines() if "d-k-nvtx" in line]
    assert all("nvidia/__init__.py" not in Path(listing).read_text() for listing in nvtx_lists)


def test_a_path_owned_by_a_distribution_outside_the_step_is_left_to_its_layer(tmp_path):
    prefix = _setup(tmp_path)
    _dist(prefix, "nvidia-nvtx-cu12", {"nvidia/__init__.py": b"", "nvidia/nvtx/lib.so": b"NVTX"})
    others = [["nvidia-cuda-runtime-cu12", f"{SITE}/nvidia/__init__.py", record_digest(b"")]]
    proc = _split(tmp_path, {"nvidia-nvtx-cu12": "k-nvtx"}, others)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not (tmp_path / "envs" / "d-k-nvtx" / SITE / "nvidia/__init__.py").exists()
    assert not (prefix / SITE / "nvidia/__init__.py").exists()   # not left over in the prefix either


def test_different_contents_take_the_owners_own_bytes_even_when_the_other_wrote_last(tmp_path):
    prefix = _setup(tmp_path)
    _dist(prefix, "fastapi", {"fastapi/__init__.py": b"", "../../../bin/fastapi": b"#!py\nfrom fastapi.cli import main\n"})
    _dist(prefix, "fastapi-cli", {"fastapi_cli/__init__.py": b"",
                                  "../../../bin/fastapi": b"#!py\nfrom fastapi_cli.cli import main\n"})
    # the install race: fastapi-cli's script is what the prefix holds now; installed alone, fastapi writes its own
    alone = tmp_path / "alone.sh"
    alone.write_text(f'[ "$1" = k-fa ] && mkdir -p {prefix}/bin && '
                     f"printf '#!py\\nfrom fastapi.cli import main\\n' > {prefix}/bin/fastapi\n")
    proc = _split(tmp_path, {"fastapi": "k-fa", "fastapi-cli": "k-cli"}, alone=str(alone))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    envs = tmp_path / "envs"
    assert (envs / "d-k-fa" / "bin" / "fastapi").read_bytes() == b"#!py\nfrom fastapi.cli import main\n"
    assert not (envs / "d-k-cli" / "bin" / "fastapi").exists()
    assert "installing fastapi alone: its own bytes of 1 shared file(s)" in proc.stdout


def test_a_changed_installed_file_fails_the_split_naming_the_distribution_and_the_file(tmp_path):
    prefix = _setup(tmp_path)
    _dist(prefix, "innocent", {"innocent/__init__.py": b"GOOD = 1\n"})
    (prefix / SITE / "innocent" / "__init__.py").write_bytes(b"import os; os.system('evil')\n")
    proc = _split(tmp_path, {"innocent": "k-inn"})
    assert proc.returncode == 1
    said = [line for line in proc.stdout.splitlines() if line.startswith(SPLIT_ERROR)]
    assert said and "innocent:" in said[0] and "innocent/__init__.py" in said[0] and "RECORD" in said[0]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "envs" / "d-k-inn").exists()   # nothing moved


def test_a_shared_file_matching_no_claimant_is_a_changed_file_not_a_race(tmp_path):
    prefix = _setup(tmp_path)
    _dist(prefix, "ns-a", {"ns/__init__.py": b""})
    _dist(prefix, "ns-b", {"ns/__init__.py": b""})
    (prefix / SITE / "ns" / "__init__.py").write_bytes(b"poisoned\n")
    proc = _split(tmp_path, {"ns-a": "k-a", "ns-b": "k-b"}, alone="/nonexistent")
    assert proc.returncode == 1 and "ns-a: " in proc.stdout and "ns/__init__.py" in proc.stdout


def test_a_row_without_a_hash_fails_unless_it_is_the_record_itself(tmp_path):
    prefix = _setup(tmp_path)
    _dist(prefix, "sloppy", {"sloppy/__init__.py": b"", "sloppy/data.bin": b"x"}, unhashed=("sloppy/data.bin",))
    proc = _split(tmp_path, {"sloppy": "k-s"})
    assert proc.returncode == 1 and "sloppy: its RECORD lists" in proc.stdout and "data.bin without a hash" in proc.stdout


def test_an_unexpected_failure_is_one_line_not_a_traceback(tmp_path):
    prefix = _setup(tmp_path)
    _dist(prefix, "known", {"known/__init__.py": b""})
    _dist(prefix, "stranger", {"stranger/__init__.py": b""})
    proc = _split(tmp_path, {"known": "k-k"})
    assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr
    assert any(line.startswith(SPLIT_ERROR) and "stranger" in line for line in proc.stdout.splitlines())


def _units(*names: str) -> list[Unit]:
    return [Unit(name, f"{name}==1", f"key-{name}") for name in names]


def test_group_keys_change_only_where_a_member_leaves_a_shared_file_to_another():
    dists = _units("nvidia-cuda-runtime-cu12", "nvidia-nvtx-cu12", "other")
    sizes = {u.key: 10 for u in dists}
    files = {u.key: {"name": u.name, "files": [[f"{SITE}/{u.name}/x.py", "sha256=a", "1"]]} for u in dists}
    plain = plan_groups(dists, sizes, "L")
    assert plan_groups(dists, sizes, "L", dropped=shared_files(files).digests()) == plain   # no shared file
    for name in ("nvidia-cuda-runtime-cu12", "nvidia-nvtx-cu12"):
        files[f"key-{name}"]["files"].append([f"{SITE}/nvidia/__init__.py", "sha256=e", "0"])
    shared = shared_files(files)
    assert shared.owners == {f"{SITE}/nvidia/__init__.py": "nvidia-cuda-runtime-cu12"}
    assert shared.dropped == {"key-nvidia-nvtx-cu12": [f"{SITE}/nvidia/__init__.py"]}
    assert shared.differing() == []
    after = plan_groups(dists, sizes, "L", dropped=shared.digests())
    changed = {g.label for g, h in zip(plain, after, strict=True) if g.key != h.key}
    holding = {g.label for g in after if any(u.name == "nvidia-nvtx-cu12" for u in g.members)}
    assert changed == holding


def test_a_split_failure_reaches_the_user_as_one_line_naming_the_distribution(tmp_path):
    import pytest

    from envmgr.build.layers import stage_units
    from envmgr.core.errors import EnvmgrError
    from tests.support.stage import stage_setup

    said = f"{SPLIT_ERROR}innocent: {SITE}/innocent/__init__.py does not match the hash in its RECORD"

    def runner(ctx, step, on_line=None):
        lines = ["+ innocent==1.0", "ENVMGR-PHASE installed", said]
        for line in lines:
            on_line(line)
        raise EnvmgrError(f"{step.title} failed (exit 1): " + " | ".join(["Traceback (most recent call last):", said]))

    ctx, base, stage = stage_setup(tmp_path, runner)
    with pytest.raises(EnvmgrError) as caught:
        stage_units(ctx, base, "m", [Unit("innocent", "innocent==1.0 --hash=sha256:00", "k-inn")], stage, [],
                    want_skeleton=False, read_archs=False)
    assert caught.value.message == f"m: innocent: {SITE}/innocent/__init__.py does not match the hash in its RECORD"
    assert "Traceback" not in str(caught.value)


def _fresh(tmp: Path, files: dict[str, bytes]) -> str:
    """A stand-in for fresh.sh (download again without the cache): writes `files` into tmp/fresh."""
    script = tmp / "fresh.sh"
    lines = ["set -e"]
    for rel, data in files.items():
        target = tmp / "fresh" / SITE / rel
        lines.append(f"mkdir -p '{target.parent}' && printf '%s' '{data.decode()}' > '{target}'")
    script.write_text("\n".join(lines) + "\n")
    return str(script)


def _split_fresh(tmp: Path, units: dict[str, str], fresh: str) -> subprocess.CompletedProcess:
    (tmp / "units.txt").write_text("".join(f"{key} {name}\n" for name, key in units.items()))
    (tmp / "skeleton").write_text("")
    (tmp / "others.jsonl").write_text("")
    (tmp / "bytecode").mkdir(exist_ok=True)
    (tmp / "split.py").write_text(SPLIT_SCRIPT)
    return subprocess.run([sys.executable, "-S", "-B", str(tmp / "split.py"), str(tmp / "prefix"), str(tmp / "envs"),
                           str(tmp / "units.txt"), str(tmp / "skeleton"), str(tmp / "bytecode" / "plan"),
                           str(tmp / "others.jsonl"), "/nonexistent", fresh, str(tmp / "fresh")],
                          capture_output=True, text=True)


def test_a_wheel_published_with_a_wrong_record_is_kept_when_a_fresh_download_has_the_same_bytes(tmp_path):
    """torch-optimi 0.3.2's wheel: its RECORD's hashes are not those of its own files, as published."""
    from envmgr.build.layers import SPLIT_WARN

    prefix = _setup(tmp_path)
    _dist(prefix, "optimi-ish", {"optimi/__init__.py": b"x = 1\n"})
    (prefix / SITE / "optimi" / "__init__.py").write_bytes(b"x = 2\n")   # the bytes the wheel really holds
    proc = _split_fresh(tmp_path, {"optimi-ish": "k-o"}, _fresh(tmp_path, {"optimi/__init__.py": b"x = 2\n"}))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    warned = [line for line in proc.stdout.splitlines() if line.startswith(SPLIT_WARN)]
    assert len(warned) == 1 and "optimi-ish" in warned[0] and "as published" in warned[0]
    recorded = json.loads((tmp_path / "envs" / "files-k-o.json").read_text())
    assert [SITE + "/optimi/__init__.py", record_digest(b"x = 2\n"), "6"] in recorded["files"]


def test_bytes_a_fresh_download_does_not_have_stop_the_split(tmp_path):
    prefix = _setup(tmp_path)
    _dist(prefix, "optimi-ish", {"optimi/__init__.py": b"x = 1\n"})
    (prefix / SITE / "optimi" / "__init__.py").write_bytes(b"x = 3\n")   # changed in the cache
    proc = _split_fresh(tmp_path, {"optimi-ish": "k-o"}, _fresh(tmp_path, {"optimi/__init__.py": b"x = 1\n"}))
    assert proc.returncode == 1 and "modified file in the uv cache" in proc.stdout
