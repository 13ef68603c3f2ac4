"""The GPU check of `envmgr run` and `envmgr doctor`: which variant of a method to run on this host
and on which GPUs, decided before the training container starts (envmgr/core/gpu.py decides; this
module gathers the facts and says the answer)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from envmgr.build.gpu_image import lock_facts
from envmgr.core import paths
from envmgr.core.errors import EnvmgrError, StaleLockError, UsageError
from envmgr.core.gpu import GpuCheck, GpuRequest, HostGpuFacts, ImageGpuFacts, check, parse_gpus
from envmgr.core.spec import MethodSpec, list_methods
from envmgr.core.variants import all_variants, label, restate_stale, variant_spec
from envmgr.door.containers import ContainerSpec, gpu_devices
from envmgr.door.context import Context
from envmgr.images.base import ensure_base
from envmgr.lock.backends import get_backend
from envmgr.runs.gpu_host import PROBE_SCRIPT, read as read_host


@dataclass
class GpuPlan:
    spec: MethodSpec                      # the variant to build and run
    request: GpuRequest
    why: str                              # which variant, and why
    host: HostGpuFacts | None = None
    checked: GpuCheck = field(default_factory=GpuCheck)

    def env(self) -> dict[str, str]:
        """What the container is told: the GPUs asked for and, when known, one process per GPU."""
        env = {paths.ENV_GPUS: self.request.env_value()}
        count = self.request.process_count(len(self.checked.gpus) or None)
        if self.request.wants_gpus and count:
            env["TRAINING_NUM_PROCESSES"] = str(count)
        return env

    def confirm(self, ctx: Context, image_id: str) -> None:
        """Check again against the built image's labels (its GPU architectures), then say which GPUs."""
        if not self.request.wants_gpus or self.host is None:
            return
        labels = ((ctx.engine.inspect_image(image_id) or {}).get("Config") or {}).get("Labels") or {}
        result = check(self.request, ImageGpuFacts.from_labels(labels), self.host, memory_gb=self.spec.gpu_memory_gb)
        if result.problem:
            raise UsageError(f"{self.spec.name}: {result.problem}")
        self.checked = result
        ctx.ui.step(f"GPUs: {'; '.join(g.describe() for g in result.gpus)} (driver {self.host.driver}); "
                    f"{self.why}", gpus=[g.index for g in result.gpus], variant=label(self.spec))
        for note in result.notes:
            ctx.ui.info(f"note: {note}")

    def record(self) -> dict:
        return {"variant": label(self.spec), "why": self.why, "gpus": [g.describe() for g in self.checked.gpus],
                "driver": self.host.driver if self.host else None}


def host_facts(ctx: Context, spec: MethodSpec) -> HostGpuFacts:
    """The host's GPUs: NVML, else nvidia-smi in a container of the method's base image given every GPU."""
    def probe() -> list[str]:
        lines: list[str] = []
        ctx.engine.run(ContainerSpec(
            image=ensure_base(ctx, spec.base_image).image_id, command=["/bin/sh", "-c", PROBE_SCRIPT],
            env={"NVIDIA_DRIVER_CAPABILITIES": "utility"}, user=f"{os.getuid()}:{os.getgid()}", network="none",
            device_requests=gpu_devices("all"), labels={paths.LABEL_KIND: "gpu-probe"}).hardened(),
            on_line=lines.append)
        return lines

    engine_at = ctx.config.engine_url or os.environ.get("DOCKER_HOST", "")
    if engine_at.startswith(("tcp://", "ssh://", "http://", "https://")):
        return read_host(probe=probe, nvml=_NoNvml)   # the engine's GPUs, not this machine's
    return read_host(probe=probe)


class _NoNvml:
    """NVML of a machine that is not the engine's: not asked."""

    class NVMLError(Exception):
        pass

    @classmethod
    def nvmlInit(cls) -> None:
        raise cls.NVMLError("the engine is on another machine")


def _built_facts(ctx: Context, spec: MethodSpec, facts: ImageGpuFacts) -> ImageGpuFacts:
    """The lock's facts, with the architectures of the variant's latest image when it has this lock's torch."""
    image = ctx.engine.inspect_image(f"{spec.image_repository}:latest") or {}
    built = ImageGpuFacts.from_labels((image.get("Config") or {}).get("Labels"))
    if built.torch == facts.torch and built.cuda == facts.cuda:
        return built
    return facts


def _newest_first(specs: list[tuple[MethodSpec, ImageGpuFacts]]) -> list[tuple[MethodSpec, ImageGpuFacts]]:
    def key(item: tuple[MethodSpec, ImageGpuFacts]) -> tuple:
        facts = item[1]
        cuda = tuple(int(p) for p in facts.cuda.split(".")) if facts.cuda else ()
        torch = tuple(int(p) for p in (facts.torch or "0").split(".") if p.isdigit())
        return (cuda, torch)
    return sorted(specs, key=key, reverse=True)   # stable: the default first among equals


def _current(spec: MethodSpec) -> MethodSpec:
    try:
        get_backend(spec).check(spec)
    except StaleLockError as exc:
        raise restate_stale(spec, exc) from None
    return spec


def preflight(ctx: Context, spec: MethodSpec, gpus: str, variant: str | None = None,
              host: HostGpuFacts | None = None) -> GpuPlan:
    """Choose the variant and check the host before anything starts; raises UsageError with the fix.

    With no `variant`, the newest variant (by CUDA, then torch) that the host's driver and GPUs can
    use; on the CPU (`--gpus none`) the default. `host` injects facts (tests).
    """
    request = parse_gpus(gpus)
    if variant is not None or not request.wants_gpus or not spec.variants:
        chosen = variant_spec(spec, variant)
        why = (f"variant {label(chosen)} (asked for)" if variant is not None
               else "the CPU (--gpus none): default variant" if not request.wants_gpus else "the only variant")
        if not request.wants_gpus:
            return GpuPlan(_current(chosen), request, why)
        candidates = [(chosen, _built_facts(ctx, chosen, lock_facts(chosen)))]
    else:
        candidates = []
        for candidate in all_variants(spec):
            facts = lock_facts(candidate)
            if facts.torch or facts.cuda or candidate is spec:
                candidates.append((candidate, _built_facts(ctx, candidate, facts)))
        candidates = _newest_first(candidates)
        why = ""
    host = host or host_facts(ctx, spec)
    results = [(c, facts, check(request, facts, host, memory_gb=c.gpu_memory_gb)) for c, facts in candidates]
    for position, (candidate, _facts, result) in enumerate(results):
        if result.ok:
            if not why:
                skipped = [f"{label(c)} {f.describe()}" for c, f, _ in results[:position]]
                why = (f"variant {label(candidate)}: the newest this host can use"
                       + (f" (not {'; '.join(skipped)}: driver {host.driver})" if skipped else ""))
            return GpuPlan(_current(candidate), request, why, host, result)
    if variant is not None and spec.variants:      # the asked-for variant cannot: would another?
        others = [c for c in all_variants(spec) if label(c) != label(candidates[0][0]) and lock_facts(c).torch]
        usable = [c for c in others if check(request, _built_facts(ctx, c, lock_facts(c)), host,
                                             memory_gb=c.gpu_memory_gb).ok]
        fix = f"; or use --variant {label(usable[0])}" if usable else ""
    else:
        fix = ""
    least, _, result = results[-1]     # the least demanding variant: what this host lacks at the least
    named = f"{spec.name} (variant {label(least)})" if spec.variants else spec.name
    raise UsageError(f"{named}: {result.problem}{fix}")


def doctor_row(ctx: Context, host: HostGpuFacts | None = None,
               methods: list[MethodSpec] | None = None) -> tuple[str, str, bool]:
    """`envmgr doctor`'s GPU line: the host's driver and GPUs as NVML sees them (no container), and
    which variant of each GPU method this host would run, or why none; not ok when a method that
    requires GPUs cannot use this host's."""
    facts = host or read_host()
    if facts.problem:
        return ("host GPUs", f"none readable: {facts.problem} (fine for `--gpus none`)", True)
    verdicts, ok = [], True
    for spec in methods if methods is not None else list_methods(ctx.config.base_dir):
        if spec.gpu == "none":
            continue
        try:
            plan = preflight(ctx, spec, "all", host=facts)
            verdicts.append(f"{spec.name} → {label(plan.spec)}")
        except EnvmgrError as exc:
            verdicts.append(f"{spec.name}: {exc.message}")
            ok = ok and spec.gpu != "required"
    return ("host GPUs", facts.describe() + "".join(f"\n    {v}" for v in verdicts), ok)


def variant_rows(ctx: Context | None, spec: MethodSpec) -> list[dict]:
    """`envmgr show`: each variant, its pins, lock state and GPU requirements (architectures when
    its image is built and the engine answers)."""
    rows = []
    for candidate in all_variants(spec):
        try:
            get_backend(candidate).check(candidate)
            state = "current"
        except StaleLockError as exc:
            state = f"stale: {restate_stale(candidate, exc)}"
        facts = lock_facts(candidate)
        if ctx is not None:
            try:
                facts = _built_facts(ctx, candidate, facts)
            except EnvmgrError:
                pass
        rows.append({"variant": label(candidate), "description": spec.variants[candidate.variant].description
                     if candidate.variant else spec.description, "pins": dict(candidate.adapt.pin) if candidate.variant
                     else {}, "lock": state, "torch": facts.torch, "cuda": facts.cuda, "cudnn": facts.cudnn,
                     "gpu_archs": list(facts.archs), "requires": facts.describe(),
                     "image": candidate.image_repository})
    return rows
