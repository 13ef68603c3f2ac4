"""The `envmgr` command: parses, calls one function per verb, prints."""

from __future__ import annotations

import json
import shlex
import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from envmgr.core.config import load_config
from envmgr.core.errors import EnvmgrError, Exit, Interrupted
from envmgr.core.ui import Reporter
from envmgr.door.context import Context

EXIT_CODES = """Exit codes: 0 ok · 1 the work failed · 2 bad input (unknown method, malformed spec or config) ·
3 lock missing or stale (run `envmgr lock`) · 4 Docker Engine unreachable · 5 a mirror failed ·
130 interrupted."""

app = typer.Typer(
    name="envmgr",
    help="Locked, reproducible, GPU-ready container environments for ML training methods.\n\n" + EXIT_CODES,
    no_args_is_help=True, add_completion=True, rich_markup_mode="markdown",
    context_settings={"help_option_names": ["-h", "--help"]},
)
base_app = typer.Typer(help="Base images (Debian + Python) built from the site's apt mirror.", no_args_is_help=True)
app.add_typer(base_app, name="base")
method_app = typer.Typer(help="Third-party training repositories as methods.", no_args_is_help=True)
app.add_typer(method_app, name="method")
key_app = typer.Typer(help="Signing keys for exports and pushes.", no_args_is_help=True)
app.add_typer(key_app, name="key")
SIGN_HELP = "Sign with this ed25519 private key (`envmgr key generate`)."

STATE: dict = {}


def _print_version(value: bool) -> None:
    """`--version`, before anything else is parsed (no verb needed)."""
    if value:
        from envmgr.core.version import describe

        print(describe())
        raise typer.Exit(0)


@app.callback()
def main(
    json_output: Annotated[bool, typer.Option("--json", help="Machine-readable JSON events on stdout.")] = False,
    verbose: Annotated[bool, typer.Option("-v", "--verbose",
                                          help="Stream the output of containers and tools.")] = False,
    base_dir: Annotated[Optional[Path], typer.Option(help="Base directory (models/, datasets/, methods/, runs/, "
                                                          "cache/). Env: ENVMGR_BASE_DIR.")] = None,
    cache_dir: Annotated[Optional[Path], typer.Option(help="Cache directory. Env: ENVMGR_CACHE_DIR.")] = None,
    pypi_mirror: Annotated[Optional[str], typer.Option(help="PyPI mirror (PEP 503 index URL) for this command. "
                                                            "Env: ENVMGR_MIRRORS_PYPI.")] = None,
    version: Annotated[bool, typer.Option("--version", help="Print the version (and git commit) and exit.",
                                          callback=_print_version, is_eager=True)] = False,
):
    flags: dict = {}
    if base_dir:
        flags["base_dir"] = str(base_dir)
    if cache_dir:
        flags["cache_dir"] = str(cache_dir)
    if pypi_mirror:
        flags["mirrors"] = {"pypi": pypi_mirror}
    STATE.update(flags=flags, mode="json" if json_output else None, verbose=verbose)


def _context() -> Context:
    ui = Reporter(STATE.get("mode"), verbose=STATE.get("verbose", False))
    STATE["ui"] = ui
    config = load_config(STATE.get("flags"))
    ui.add_secrets(config.secrets())
    return Context(config=config, ui=ui)


def _fail(exc: EnvmgrError) -> None:
    ui = STATE.get("ui") or Reporter(STATE.get("mode"))
    ui.error(str(exc.message), exc.hint, label="interrupted" if isinstance(exc, Interrupted) else "error")
    raise typer.Exit(int(exc.exit_code))


def _sigterm_as_interrupt() -> None:
    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def verb(function):
    """Run a verb with errors turned into one line and an exit code."""
    import functools

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        _sigterm_as_interrupt()
        try:
            return function(*args, **kwargs)
        except EnvmgrError as exc:
            _fail(exc)
        except KeyboardInterrupt:
            _fail(Interrupted("nothing was tagged; containers were removed"))
        except typer.Exit:
            raise
        except Exception as exc:  # noqa: BLE001 - one line for the user, the traceback in a log file (and with -v)
            _internal_error(exc)

    return wrapper


def _internal_error(exc: BaseException) -> None:
    """An exception envmgr did not expect: one line, the traceback in a log file, the command to rerun with -v."""
    import traceback

    from envmgr.core.credentials import mask_credentials

    ui = STATE.get("ui") or Reporter(STATE.get("mode"))
    text = "".join(traceback.format_exception(exc))
    if STATE.get("verbose"):
        sys.stderr.write(ui.redact(mask_credentials(text)))
    said = (str(exc).strip().splitlines() or [""])[0]
    message = mask_credentials(f"internal error: {type(exc).__name__}" + (f": {said}" if said else ""))
    args = [a for a in sys.argv[1:] if a not in ("-v", "--verbose")]
    rerun = mask_credentials(" ".join(["envmgr", "-v", *(shlex.quote(a) for a in args)]))
    log = _write_internal_log(ui.redact(mask_credentials(f"$ {rerun}\n{text}")))
    where = f"the traceback is in {log}; " if log else ""
    again = "report it" if STATE.get("verbose") else f"rerun with `{rerun}` to see it, and report it"
    _fail(EnvmgrError(message, hint=where + again))


def _write_internal_log(text: str) -> Path | None:
    """`<cache_dir>/logs/internal-<time>-<pid>.log` (mode 0600), or under the temp dir when the cache is unusable."""
    import datetime as dt
    import os
    import tempfile

    name = f"internal-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    folders = []
    try:
        folders.append(load_config(STATE.get("flags")).cache_dir / "logs")
    except Exception:  # noqa: BLE001 - a config that cannot be read must not hide the first error
        pass
    folders.append(Path(tempfile.gettempdir()) / f"envmgr-{os.getuid()}")
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
            with os.fdopen(fd, "w", encoding="utf-8", errors="replace") as fh:
                fh.write(text)
            return folder / name
        except OSError:
            continue
    return None


# ---------------------------------------------------------------------- verbs


@base_app.command("build")
@verb
def base_build(name: Annotated[str, typer.Argument(help="A folder of images/ (default bookworm-py311).")]
               = "bookworm-py311"):
    """Build a base image with debuerreotype through the apt mirror and load it into the engine."""
    from envmgr.images.base import build_base

    ctx = _context()
    build_base(ctx, name)


@method_app.command("add")
@verb
def method_add(
    source: Annotated[Path, typer.Argument(help="The repository: a folder, a zip or a tar.gz.")],
    name: Annotated[str, typer.Option("--name", help="The method's name.")],
    entry: Annotated[Optional[str], typer.Option(help="Entry file in the repository (default: train.sh or "
                                                      "train.py).")] = None,
    backend: Annotated[Optional[str], typer.Option(help="poetry | conda | pip, when the repository has "
                                                        "several environment files.")] = None,
    gpu: Annotated[str, typer.Option(help="required | optional | none")] = "optional",
):
    """Add a training repository as a method in <base_dir>/methods/NAME (unforked: adapt it in its envmgr.toml)."""
    from envmgr.lock.methods import add_method

    ctx = _context()
    spec, detected = add_method(ctx.config.base_dir, source, name, entry=entry, backend=backend, gpu=gpu)
    if detected.note:
        ctx.ui.warn(detected.note)
    ctx.ui.success(f"added {spec.name}: {detected.backend} ({detected.reason}), entry {' '.join(spec.entry)} → "
                   f"{spec.folder}", method=spec.name, backend=spec.backend, entry=spec.entry, folder=str(spec.folder))
    ctx.ui.info(f"next: `envmgr lock {spec.name}` (adapt it in {spec.folder / 'envmgr.toml'} if that reports "
                "sources the site cannot reach)")


@app.command("list")
@verb
def list_cmd():
    """List the built-in (envs/) and added (<base_dir>/methods/) methods."""
    from envmgr.core.spec import list_methods

    ctx = _context()
    methods = list_methods(ctx.config.base_dir)
    if ctx.ui.mode == "json":
        ctx.ui.event("methods", methods=[{"name": m.name, "backend": m.backend, "builtin": m.builtin,
                                          "folder": str(m.folder)} for m in methods])
        return
    from rich.table import Table

    table = Table("method", "backend", "python", "gpu", "where", "description", box=None)
    for m in methods:
        table.add_row(m.name, m.backend, m.python, m.gpu, "built-in" if m.builtin else "added", m.description)
    ctx.ui.console.print(table)


@app.command()
@verb
def show(method: Annotated[str, typer.Argument(help="Method name.")]):
    """Show a method's spec, lock state and image."""
    from envmgr.core.errors import StaleLockError
    from envmgr.core.spec import find_method
    from envmgr.lock.backends import get_backend

    ctx = _context()
    spec = find_method(method, ctx.config.base_dir)
    backend = get_backend(spec)
    try:
        backend.check(spec)
        lock_state = "current"
    except StaleLockError as exc:
        lock_state = f"stale: {exc.message}"
    summary = backend.summary(spec)
    info = {"name": spec.name, "backend": spec.backend, "folder": str(spec.folder), "python": spec.python,
            "base_image": spec.base_image, "entry": spec.entry, "gpu": spec.gpu,
            "default_model": spec.default_model, "env": spec.env, "lock": lock_state,
            "packages": summary.get("packages"), "adaptations": spec.adapt.describe()}
    from envmgr.runs.gpu_plan import variant_rows

    variants = variant_rows(ctx, spec) if spec.gpu != "none" or spec.variants else []
    if ctx.ui.mode == "json":
        ctx.ui.event("method", **info, pins=summary.get("pins"), variants=variants)
        return
    for key, value in info.items():
        if key == "adaptations":
            value = "none" if not value else "\n" + "\n".join(f"{'':>15}{line}" for line in value)
        ctx.ui.console.print(f"[bold]{key:>13}[/]  {escape(str(value))}", markup=True, highlight=False)
    for row in variants:
        pinned = ", ".join(f"{k} {v}" for k, v in row["pins"].items())
        line = f"{row['variant']}: {row['requires']}" + (f" [{pinned}]" if pinned else "") + \
            ("" if row["lock"] == "current" else f" (lock {row['lock']})")
        ctx.ui.console.print(f"[bold]{'variant' if row is variants[0] else '':>13}[/]  {escape(line)}", markup=True,
                             highlight=False)
    pins = summary.get("pins") or {}
    if pins and ctx.ui.verbose:
        for name, version in sorted(pins.items()):
            ctx.ui.console.print(f"{'':>15}{name}=={version}")


@app.command()
@verb
def lock(
    method: Annotated[str, typer.Argument(help="Method name.")],
    check: Annotated[bool, typer.Option("--check", help="Only check that the lock is current (exit 3 if not).")]
    = False,
    regenerate: Annotated[bool, typer.Option(
        "--regenerate", help="Re-solve every package, not only changes (a method with a lock of its own starts "
                             "again from that lock).")]
    = False,
    variant: Annotated[Optional[str], typer.Option(help="Lock this variant of the method (see `envmgr show`).")]
    = None,
):
    """Lock a method's environment for its target platform, through the site's mirrors."""
    from envmgr.lock.lock import lock as lock_method

    ctx = _context()
    result = lock_method(ctx, method, check=check, regenerate=regenerate, variant=variant)
    if result.current:
        ctx.ui.success(f"{result.method}: lock is current", method=result.method, current=True)
        return
    if result.seeded_from:
        ctx.ui.info(f"{result.method}: started from the repository's pins in {result.seeded_from}")
    if result.drift is not None:
        from envmgr.lock.adapt import describe_drift

        moved = describe_drift(result.drift)
        theirs = result.seeded_from or "own lock"
        ctx.ui.info(f"{result.method}: {len(moved)} change{'' if len(moved) == 1 else 's'} against the "
                    f"repository's {theirs}" + (":" if moved else " (every version kept)"))
        for line in moved:
            ctx.ui.info(f"  {line}")
    ctx.ui.success(f"{result.method}: locked → {', '.join(str(p) for p in result.files)}",
                   method=result.method, files=[str(p) for p in result.files], drift=result.drift,
                   seeded_from=result.seeded_from)


@app.command()
@verb
def build(
    method: Annotated[str, typer.Argument(help="Method name.")],
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if the image for these inputs exists.")]
    = False,
    variant: Annotated[Optional[str], typer.Option(help="Build this variant of the method (see `envmgr show`).")]
    = None,
):
    """Build the method's image from its lock (a no-op when the image for these inputs exists)."""
    from envmgr.build.build import build as build_image
    from envmgr.core.errors import StaleLockError
    from envmgr.core.spec import find_method
    from envmgr.core.variants import restate_stale, variant_spec

    ctx = _context()
    spec = variant_spec(find_method(method, ctx.config.base_dir), variant)
    try:
        result = build_image(ctx, spec, force=force)
    except StaleLockError as exc:
        raise restate_stale(spec, exc) from None
    what = "up to date" if result.reused else "built"
    ctx.ui.success(f"{spec.name}: {what} {result.tag} ({result.image_id[:19]}, {result.seconds:.1f} s)",
                   method=spec.name, image=result.image_id, tag=result.tag, reused=result.reused,
                   inputs_hash=result.inputs_hash, lock_hash=result.lock_hash, seconds=round(result.seconds, 3))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@verb
def run(
    typer_ctx: typer.Context,
    method: Annotated[str, typer.Argument(help="Method name.")],
    model: Annotated[Optional[str], typer.Option(help="Model folder under <base_dir>/models (or a path); "
                                                      "default: the method's default_model.")] = None,
    dataset: Annotated[Optional[str], typer.Option(help="Dataset file or folder under <base_dir>/datasets "
                                                        "(or a path).")] = None,
    gpus: Annotated[Optional[str], typer.Option(help="all | none | a count (2) | indices (0,1). Default: all "
                                                     "for GPU methods.")] = None,
    network: Annotated[str, typer.Option(help="Container network: none (default), host, bridge.")] = "none",
    resume: Annotated[Optional[str], typer.Option(help="Continue an interrupted run (its run id).")] = None,
    shm_size: Annotated[Optional[str], typer.Option(help="/dev/shm size, e.g. 8g (default: the site's [run] "
                                                            "shm_size, else 1/4 of RAM, at most 16g).")] = None,
    on: Annotated[str, typer.Option("--on", help="Where: local (this engine, default) or slurm (submit to the "
                                                 "site's Slurm; the base dir must be shared).")] = "local",
    nodes: Annotated[int, typer.Option(help="[slurm] Nodes (machines of one accelerate run).")] = 1,
    gpus_per_node: Annotated[Optional[int], typer.Option(help="[slurm] GPUs per node from Slurm's allocation "
                                                              "(default 1 for GPU methods, else 0).")] = None,
    tasks_per_node: Annotated[int, typer.Option(help="[slurm] Containers (accelerate machines) per node.")] = 1,
    partition: Annotated[Optional[str], typer.Option(help="[slurm] Partition.")] = None,
    time_limit: Annotated[Optional[str], typer.Option("--time", help="[slurm] Time limit, e.g. 4:00:00.")] = None,
    account: Annotated[Optional[str], typer.Option(help="[slurm] Account to charge.")] = None,
    registry: Annotated[Optional[str], typer.Option(help="[slurm] Site registry host[:port] the nodes pull the "
                                                         "image from (default: an export archive in the base dir).")]
    = None,
    node_runtime: Annotated[str, typer.Option(help="[slurm] docker (each node's engine) or pyxis (srun "
                                                   "--container-image= with an enroot squashfs).")] = "docker",
    wait: Annotated[bool, typer.Option("--wait", help="[slurm] Follow the job to its end like a local run.")] = False,
    wait_timeout: Annotated[Optional[float], typer.Option(help="[slurm] With --wait: seconds the job may stay "
                                                               "pending; then it is cancelled.")] = None,
    sign: Annotated[Optional[Path], typer.Option("--sign", help="[slurm] Private key that signs the export archive "
                                                               "the nodes import (for nodes with [trust] "
                                                               "require_signature).")] = None,
    memory: Annotated[Optional[str], typer.Option(help="Memory limit of the run's container, e.g. 64g "
                                                       "(default: the site's [run] memory, else 7/8 of RAM).")] = None,
    as_root: Annotated[bool, typer.Option("--as-root", help="Run the method as root inside its container "
                                                            "(recorded in run.json). Default when envmgr is root: "
                                                            "the sudo caller, else the site's [run] run_as "
                                                            "(65534:65534).")] = False,
    variant: Annotated[Optional[str], typer.Option(help="Run this variant (default: the newest one this host's "
                                                        "driver and GPUs can use).")] = None,
    inputs: Annotated[Optional[list[str]], typer.Option(
        "--input", help="PATH[:NAME]: a file or folder mounted read-only at /envmgr/inputs/NAME (default NAME: "
                        "its basename), hashed in run.json. Repeatable.")] = None,
    env_vars: Annotated[Optional[list[str]], typer.Option(
        "--env", help="K=V for the method's environment, recorded in run.json, never part of the image. "
                      "Repeatable.")] = None,
    files: Annotated[Optional[list[str]], typer.Option(
        "--file", help="SRC:REL: a host file or folder placed in the method's folder at REL for this run (its "
                       "writable copy with workdir = \"method\", else mounted read-only), hashed in run.json and "
                       "placed again on --resume. Repeatable.")] = None,
):
    """Run a method in its image. Arguments after `--` go to the method's entry
    (e.g. `envmgr run sd-demo --dataset sample.zip -- --max_steps=100`)."""
    from envmgr.core.spec import find_method
    from envmgr.runs import targets
    from envmgr.runs.plan import RunRequest

    ctx = _context()
    spec = find_method(method, ctx.config.base_dir)
    request = RunRequest(method=spec, model=model, dataset=dataset, gpus=gpus, network=network,
                         args=list(typer_ctx.args), resume=resume, shm_size=shm_size,
                         memory=memory, as_root=as_root, variant=variant,
                         inputs=list(inputs or []), env=list(env_vars or []), files=list(files or []))
    target = targets.pick(on)
    record = target.submit(ctx, request, {
        "nodes": nodes, "gpus_per_node": gpus_per_node, "tasks_per_node": tasks_per_node, "partition": partition,
        "time": time_limit, "account": account, "registry": registry, "runtime": node_runtime, "sign": sign})
    if target.hands_over:   # the run goes on there: followed with --wait, else said where it went
        if not wait:
            where, fields = target.handed_over(record)
            ctx.ui.success(f"run {record['run_id']} submitted: {where} (`envmgr runs show {record['run_id']}`)",
                           run_id=record["run_id"], **fields, status=record["status"])
            return
        record = target.follow(ctx, record, wait_timeout)
    run_dir = ctx.config.base_dir / "runs" / spec.name / record["run_id"]
    found = record.get("artifacts", {})
    ctx.ui.success(f"run {record['run_id']} succeeded → {run_dir}", run_id=record["run_id"], run_dir=str(run_dir),
                   artifacts=found)
    for kind, items in found.items():
        if items:
            ctx.ui.info(f"{kind:>17}: {run_dir / items[0]}" + (f" (+{len(items) - 1} more)" if len(items) > 1 else ""))


runs_app = typer.Typer(help="Runs and their records.", invoke_without_command=True)
app.add_typer(runs_app, name="runs")


@runs_app.callback()
@verb
def runs_list(typer_ctx: typer.Context,
              method: Annotated[Optional[str], typer.Option(help="Only this method's runs.")] = None):
    """List runs (newest last)."""
    if typer_ctx.invoked_subcommand:
        return
    from envmgr.runs import targets
    from envmgr.runs.ledger import list_runs, refresh

    ctx = _context()
    records = refresh(list_runs(ctx, method))
    if ctx.ui.mode == "json":
        ctx.ui.event("runs", runs=records)
        return
    from rich.table import Table

    table = Table("run", "method", "status", "where", "started", "ended", "image", box=None)
    for r in records:
        image = r["image"] if isinstance(r.get("image"), dict) else {}
        table.add_row(r["run_id"], r["method"], r["status"], targets.of(r).where(r), str(r.get("started") or ""),
                      str(r.get("ended") or ""), str(image.get("tag") or ""))
    ctx.ui.console.print(table)


@runs_app.command("show")
@verb
def runs_show(run_id: Annotated[str, typer.Argument(help="Run id (from `envmgr runs`).")]):
    """Show one run's record."""
    from envmgr.runs.ledger import find_run, refresh

    ctx = _context()
    record = refresh([find_run(ctx, run_id)])[0]
    if ctx.ui.mode == "json":
        ctx.ui.event("run", **record)
    else:
        from envmgr.runs.verdict import describe

        ctx.ui.console.print_json(json.dumps(record))
        ctx.ui.console.print(describe(record), markup=False, highlight=False)
        hint = record["verdict"].get("hint") if isinstance(record.get("verdict"), dict) else None
        if hint:
            ctx.ui.console.print(f"  {hint}", markup=False, highlight=False)


@runs_app.command("cancel")
@verb
def runs_cancel(run_id: Annotated[str, typer.Argument(help="Run id of a Slurm run (from `envmgr runs`).")]):
    """Cancel a Slurm run: its steps stop their containers and keep their checkpoints (`interrupted`)."""
    from envmgr.runs.ledger import cancel

    ctx = _context()
    record = cancel(ctx, run_id)
    ctx.ui.success(f"run {run_id}: {record['status']}" + (f" ({record['reason']})" if record.get("reason") else ""),
                   run_id=run_id, status=record["status"])


@app.command("slurm-step", hidden=True)
@verb
def slurm_step(run_dir: Annotated[Path, typer.Argument(help="The run directory (shared).")],
               finish: Annotated[Optional[int], typer.Option(help="The job step's exit status: record a verdict "
                                                                  "if no step wrote one.")] = None):
    """Inside a Slurm job: one machine of a run (node-local `envmgr run`), or the job's closing record."""
    from envmgr.runs import slurm

    ctx = _context()
    if finish is not None:
        slurm.finish(run_dir, finish)
        return
    record = slurm.step(ctx, run_dir)
    ctx.ui.success(f"run {record['run_id']} step on {record.get('host')}: {record['status']}", **{
        "run_id": record["run_id"], "status": record["status"]})


@app.command("export")
@verb
def export_cmd(
    method: Annotated[str, typer.Argument(help="Method name.")],
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Archive file (default "
                                                   "<method>-<inputs hash>.envmgr.tar).")] = None,
    compress: Annotated[str, typer.Option(help="none (default: fastest, loads as is) or gzip (level 6, "
                                               "deterministic).")] = "none",
    format_: Annotated[str, typer.Option("--format", help="envmgr (default: an archive `envmgr import` and "
                                                         "`docker load` take) or squashfs (an enroot image for "
                                                         "pyxis/enroot sites).")] = "envmgr",
    sign: Annotated[Optional[Path], typer.Option("--sign", help=SIGN_HELP)] = None,
    thin_for: Annotated[Optional[str], typer.Option(
        "--thin-for", metavar="IMAGE_OR_ARCHIVE",
        help="Leave out the layers the target server already has: IMAGE_OR_ARCHIVE is an image (reference or ID) in "
             "this engine that the target has, or an earlier export archive sent there (only its header is "
             "read). The layers the two images share from the bottom (base, shared environment layers) are "
             "left out and listed, signed, in the archive; `envmgr import` there refuses, naming them, if its "
             "engine lacks any. The method layer always travels.")] = None,
):
    """Write the method's image, spec, lock and files into one archive for a server that reaches nothing."""
    from envmgr.ship.transfer import export

    ctx = _context()
    if format_ == "squashfs" and thin_for is not None:
        from envmgr.core.errors import UsageError

        raise UsageError("--thin-for works with --format envmgr only: an enroot image is one squashfs of the "
                         "whole tree, it has no layers to leave out")
    if format_ == "squashfs":
        from envmgr.ship.squashfs import export_squashfs

        enroot = export_squashfs(ctx, method, output)
        ctx.ui.success(f"{enroot['method']}: {enroot['tag']} → {enroot['file']} ({enroot['bytes'] / 1e6:.1f} MB, "
                       "enroot image)", **enroot)
        return
    if format_ != "envmgr":
        from envmgr.core.errors import UsageError

        raise UsageError(f"--format {format_!r}: expected envmgr or squashfs")
    result = export(ctx, method, output, compress, sign=sign, thin_for=thin_for)
    thin = (f", thin: {result.left_out} layers ({result.left_out_bytes / 1e6:.1f} MB) left out for "
            f"{result.thin_for[:19]}" if result.thin_for and result.left_out else "")
    ctx.ui.success(f"{result.method}: {result.tag} → {result.file} ({result.size / 1e6:.1f} MB{thin})",
                   **result.fields())


@app.command("import")
@verb
def import_cmd(
    archive: Annotated[Path, typer.Argument(help="An archive written by `envmgr export`.")],
    replace: Annotated[bool, typer.Option("--replace", help="Replace an added method of the same name "
                                                            "whose files differ.")] = False,
    replace_base: Annotated[bool, typer.Option("--replace-base", help="Make the archive's base image current "
                                                                      "here when this server has another.")]
    = False,
):
    """Check every hash in an exported archive, then load its image and register its method.

    A thin archive (`export --thin-for`) is loaded only when this engine already has every layer it
    left out; otherwise it is refused, naming the missing layers, and nothing is loaded."""
    from envmgr.ship.transfer import import_archive

    ctx = _context()
    result = import_archive(ctx, archive, replace_base=replace_base, replace=replace)
    what = "imported" if result.changed else "already imported, nothing changed:"
    signature = result.signature or {}
    signed = f", signed by {signature['key_id']} ({signature['state']})" if signature.get("key_id") else ", unsigned"
    ctx.ui.success(f"{result.method}: {what} {result.tag} ({result.image_id[:19]}{signed})", **result.fields())


@app.command()
@verb
def push(method: Annotated[str, typer.Argument(help="Method name.")],
         registry: Annotated[str, typer.Argument(help="Registry host[:port], e.g. 127.0.0.1:5000.")],
         sign: Annotated[Optional[Path], typer.Option("--sign", help=SIGN_HELP)] = None):
    """Push the method's current image to a registry as `REGISTRY/envmgr/METHOD:INPUTS-HASH`."""
    from envmgr.ship.registry import push as push_image

    ctx = _context()
    result = push_image(ctx, method, registry, sign=sign)
    ctx.ui.success(f"{result.method}: pushed {result.reference}@{result.digest} ({result.layers_pushed} layers "
                   f"uploaded, {result.layers_existing} already in the registry)", **result.fields())


@app.command()
@verb
def pull(method: Annotated[str, typer.Argument(help="Method name.")],
         registry: Annotated[str, typer.Argument(help="Registry host[:port], e.g. 127.0.0.1:5000.")]):
    """Pull the image this server's lock and inputs call for, and check its labels against them."""
    from envmgr.ship.registry import pull as pull_image

    ctx = _context()
    result = pull_image(ctx, method, registry)
    ctx.ui.success(f"{result.method}: pulled {result.reference} → {result.tag} ({result.image_id[:19]})",
                   **result.fields())


@app.command()
@verb
def verify(
    method: Annotated[str, typer.Argument(help="Method name.")],
    rebuild: Annotated[bool, typer.Option("--rebuild/--no-rebuild", help="Make the image again in a scratch "
                                          "cache and compare image IDs (needs the mirrors).")] = True,
):
    """Check that the image in use is the one its inputs make, and its installed files match their RECORDs."""
    from envmgr.ship.verify import verify as verify_method

    ctx = _context()
    result = verify_method(ctx, method, rebuild=rebuild)
    for line in result.report():
        ctx.ui.info(line)
    if not result.ok:
        ctx.ui.event("verify", **result.fields())
        raise EnvmgrError(result.failure())
    ctx.ui.success(f"{result.method}: verified {result.in_use_ref}", **result.fields())


@app.command()
@verb
def gc(
    keep: Annotated[int, typer.Option(help="Also keep the N most recent superseded images of each method.")] = 1,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only say what would be removed.")] = False,
    method: Annotated[Optional[list[str]], typer.Option("--method", help="Only these methods (repeatable).")]
    = None,
    everything: Annotated[bool, typer.Option("--all", help="Also empty the download caches (uv, poetry, conda) "
                                                           "and envmgr's memos, not only what no current lock "
                                                           "names.")] = False,
):
    """Remove superseded method images, stopped envmgr containers and stale cache entries (never what is in use)."""
    from envmgr.gc.gc import apply, plan
    from envmgr.runs.ledger import list_runs

    ctx = _context()
    if not dry_run:
        list_runs(ctx)    # settle runs whose envmgr was killed, before their stopped containers go
    result = plan(ctx, keep=keep, methods=method, everything=everything)
    if not dry_run:
        result = apply(ctx, result)
    verb_word = "would remove" if dry_run else "removed"
    for item in result.remove:
        ctx.ui.info(f"{verb_word} {item.kind}: {item.why} ({item.bytes / 1e6:.1f} MB)"
                    if item.kind in ("image", "container") else
                    f"{verb_word} {item.kind}: {item.what} ({item.bytes / 1e6:.1f} MB)")
    for item in result.keep:
        if "refused" in item.why:
            ctx.ui.info(f"kept {item.kind} {item.what[:19]}: {item.why}")
    disk = []
    if dry_run:
        from envmgr.gc.disk import describe, usage

        disk = usage(ctx, set(method) if method else None)
        ctx.ui.info("disk use per method:")
        for entry in disk:
            ctx.ui.info(f"  {describe(entry)}")
    ctx.ui.success(f"{verb_word} {len(result.remove)} items, {result.freed() / 1e6:.1f} MB"
                   + (" freed" if not dry_run else ""), dry_run=dry_run, bytes_freed=result.freed(),
                   removed=[vars(i) for i in result.remove], kept=[vars(i) for i in result.keep],
                   disk=[entry.as_dict() for entry in disk])


@key_app.command("generate")
@verb
def key_generate(path: Annotated[Path, typer.Argument(help="Private key file (mode 0600); the public key "
                                                           "goes to PATH.pub.")]):
    """Write a new ed25519 key pair for `export --sign` and `push --sign`."""
    from envmgr.ship.signing import generate_key

    ctx = _context()
    result = generate_key(path)
    ctx.ui.success(f"key {result['key_id']}: private {result['private_key']}, public {result['public_key']} "
                   "(list the public one in [trust] keys on the servers that import)", **result)


@app.command()
@verb
def sbom(method: Annotated[str, typer.Argument(help="Method name.")],
         fmt: Annotated[str, typer.Option("--format", help="cyclonedx-json (the only one so far).")]
         = "cyclonedx-json"):
    """Print the SBOM of the method's current image (Python, conda and Debian packages with versions)."""
    from envmgr.build.sbom import for_method

    ctx = _context()
    ctx.ui.data_on_stdout()
    _, data = for_method(ctx, method, fmt)
    sys.stdout.write(data.decode())
    sys.stdout.write("\n")


@app.command()
@verb
def doctor():
    """Show the effective configuration, where each value came from, and what is missing."""
    from envmgr.face import doctor as diagnose

    ctx = _context()
    from envmgr.gc.disk import describe, usage

    rows = diagnose.settings(ctx.config)
    checks = diagnose.checks(ctx)
    disk = usage(ctx)
    from envmgr.gc.caches import usage as cache_usage

    caches = cache_usage(ctx)
    if ctx.ui.mode == "json":
        ctx.ui.event("doctor", settings=[vars(row) for row in rows], checks=[vars(check) for check in checks],
                     disk=[entry.as_dict() for entry in disk], caches=[entry.as_dict() for entry in caches])
    else:
        from rich.table import Table

        table = Table("setting", "value", "from", box=None)
        for row in rows:
            table.add_row(*[ctx.ui.redact(x) for x in (row.key, row.value, row.origin)])
        ctx.ui.console.print(table)
        for check in checks:
            ctx.ui.console.print(f"{'[green]ok[/]' if check.ok else '[red]!![/]'}  {check.check}: "
                                 f"{ctx.ui.redact(check.status)}")
        if disk:
            ctx.ui.console.print("disk use per method:", markup=False)
            for entry in disk:
                ctx.ui.console.print(f"    {describe(entry)}", markup=False)
        if caches:
            ctx.ui.console.print(f"caches ({sum(c.bytes for c in caches) / 1e9:.2f} GB; `envmgr gc` trims them):",
                                 markup=False)
            for cache in caches:
                ctx.ui.console.print(f"    {cache.name:<13} {cache.bytes / 1e6:>10.1f} MB  {cache.holds or cache.path}",
                                     markup=False)
    code = diagnose.exit_code(checks)
    if code != Exit.OK:
        raise typer.Exit(int(code))


def entry() -> None:
    """The `envmgr` command: the typer app, with errors raised before any verb ran reported too."""
    try:
        app()
    except EnvmgrError as exc:  # raised while parsing the config, before a verb ran
        Reporter(STATE.get("mode")).error(str(exc.message), exc.hint)
        sys.exit(int(exc.exit_code))
    except Exception as exc:  # noqa: BLE001 - outside a verb too: one line, the traceback in a log file
        try:
            _internal_error(exc)
        except typer.Exit as done:
            sys.exit(done.exit_code)

