"""The training loop: cached latents + embeddings -> noise -> predict -> loss -> step.

Read `train` top to bottom: set-up, cache, model + LoRA, optimizer, resume, then one
`train_step` per optimizer step, with checkpoints, validation and a clean stop on
SIGTERM/SIGINT (checkpoint, exit code 130). Each micro-batch (latents, embeddings, noise,
timesteps) is prepared on the CPU by `Trainer.prepare_batch`, a background thread a few steps
ahead (`data.ReadAhead`); the step itself only moves it to the device and runs the model.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.nn.functional as F

from . import checkpoint, data, events, metrics, model, validation
from .config import LORA_TARGETS, TrainConfig
from .device import check_gpu_request, gradient_checkpointing_wanted
from .profile import NO_PROFILE

log = logging.getLogger("sd_trainer")
EXIT_INTERRUPTED = 130
DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NONFINITE_LIMIT = 5  # consecutive non-finite losses before the run stops (nothing is saved from them)


class TrainingError(Exception):
    """Training cannot go on (e.g. the loss diverged); one line saying why and what to try."""


class StopFlag:
    """Set by the SIGTERM/SIGINT handler; the loop checks it between steps."""

    def __init__(self):
        self.signal: int | None = None

    def request(self, signum: int) -> None:
        self.signal = signum

    def __call__(self) -> bool:
        return self.signal is not None


def resolve_precision(config: TrainConfig) -> str:
    """config.json wins, then what `accelerate launch --mixed_precision` set; bf16/fp16 need a GPU."""
    wanted = config.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION") or "bf16"
    if wanted != "no" and not torch.cuda.is_available():
        log.warning("mixed_precision=%s needs a GPU; no GPU found, training in fp32 on CPU", wanted)
        return "no"
    return wanted


@dataclass
class Trainer:
    """Everything one optimizer step needs."""

    config: TrainConfig
    accelerator: object
    transformer: torch.nn.Module
    parameters: list
    optimizer: object
    lr_scheduler: object
    training_set: data.TrainingSet
    plan: data.BatchPlan
    dtype: torch.dtype
    shift: float
    nonfinite_streak: int = field(default=0)
    profile: object = field(default=NO_PROFILE)  # a profile.StepProfile to time the phases of each step
    batches: data.ReadAhead | None = None  # None: each micro-batch is prepared when its step needs it

    def sample_sigmas(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """Logit-normal (or uniform) u, then the model's timestep shift: sigma = s*u / (1 + (s-1)*u)."""
        config = self.config
        if config.weighting_scheme == "logit_normal":
            u = torch.sigmoid(torch.randn(count, generator=generator) * config.logit_std + config.logit_mean)
        else:
            u = torch.rand(count, generator=generator)
        return self.shift * u / (1 + (self.shift - 1) * u)

    def prepare_batch(self, key: tuple[int, int]) -> data.Batch:
        """Micro-batch `micro` of `step` on this rank, on the CPU: a function of (seed, step, micro, rank) only."""
        step, micro = key
        config, cached, rank = self.config, self.training_set, self.accelerator.process_index
        indices = self.plan.indices(step, micro, rank)
        generator = data.step_generator(config.seed, step, micro, rank)

        flip = None
        if config.random_flip:  # its own RNG: the noise and sigma streams stay as without flipping
            flip = torch.rand(len(indices), generator=data.step_generator(config.seed + 1, step, micro, rank)) < 0.5
        latents = cached.latents(indices, flip)
        caption_ids = cached.caption_ids[indices]
        if config.caption_dropout_probability > 0:
            dropped = torch.rand(len(indices), generator=generator) < config.caption_dropout_probability
            caption_ids = torch.where(dropped, torch.full_like(caption_ids, data.EMPTY_PROMPT_ID), caption_ids)
        prompt_embeds, pooled_embeds = cached.prompt_embeddings(caption_ids)
        noise = torch.randn(latents.shape, generator=generator)
        sigmas = self.sample_sigmas(len(indices), generator)

        sigma = sigmas.view(-1, 1, 1, 1)
        batch = data.Batch(noisy=(1 - sigma) * latents + sigma * noise, target=noise - latents, timesteps=sigmas * 1000,
                           prompt_embeds=prompt_embeds, pooled_embeds=pooled_embeds)
        return batch.pin_memory() if self.accelerator.device.type == "cuda" else batch

    def micro_step_loss(self, step: int, micro: int) -> torch.Tensor:
        accelerator, device, profile = self.accelerator, self.accelerator.device, self.profile
        with profile.phase("data"):
            key = (step, micro)
            batch = self.batches.get(key) if self.batches is not None else self.prepare_batch(key)
        with profile.phase("forward"):
            asynchronous = device.type == "cuda"
            noisy = batch.noisy.to(device, self.dtype, non_blocking=asynchronous)
            target = batch.target.to(device, torch.float32, non_blocking=asynchronous)
            with accelerator.autocast():
                prediction = self.transformer(
                    hidden_states=noisy,
                    timestep=batch.timesteps.to(device, non_blocking=asynchronous),
                    encoder_hidden_states=batch.prompt_embeds.to(device, self.dtype, non_blocking=asynchronous),
                    pooled_projections=batch.pooled_embeds.to(device, self.dtype, non_blocking=asynchronous),
                    return_dict=False,
                )[0]
            return F.mse_loss(prediction.float(), target)

    def train_step(self, step: int) -> float:
        accumulation, profile = self.config.gradient_accumulation_steps, self.profile
        losses = []
        if not self.transformer.training:  # validation puts it back in training mode; no walk over every module
            self.transformer.train()
        for micro in range(accumulation):
            last = micro == accumulation - 1
            sync = contextlib.nullcontext() if last else self.accelerator.no_sync(self.transformer)
            with sync:
                loss = self.micro_step_loss(step, micro)
                if self.batches is not None:
                    self.batches.resume()  # the next batch is prepared while backward runs without the GIL
                with profile.phase("backward"):
                    self.accelerator.backward(loss / accumulation)
            losses.append(loss.detach())
        with profile.phase("optimizer"):
            return self.finish_step(step, losses)

    def finish_step(self, step: int, losses: list[torch.Tensor]) -> float:
        """The mean loss over the micro-batches; clip, step and schedule unless it is not finite."""
        mean = torch.stack(losses).mean()
        if self.accelerator.num_processes > 1:
            mean = self.accelerator.reduce(mean, reduction="mean")
        loss_value = mean.item()  # the same on every rank, so all ranks skip or step together
        if not math.isfinite(loss_value):
            self.skip_nonfinite(step, loss_value)
            return loss_value
        self.nonfinite_streak = 0
        self.clip_gradients()
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value

    def clip_gradients(self) -> None:
        if self.config.max_grad_norm <= 0:
            return
        if self.config.grad_clip_method == "value":
            self.accelerator.clip_grad_value_(self.parameters, self.config.max_grad_norm)
        else:
            self.accelerator.clip_grad_norm_(self.parameters, self.config.max_grad_norm)

    def skip_nonfinite(self, step: int, loss_value: float) -> None:
        """Drop this step's gradients (the LoRA stays finite); stop after NONFINITE_LIMIT in a row."""
        self.optimizer.zero_grad(set_to_none=True)
        self.nonfinite_streak += 1
        log.warning("step %d: loss is %s; step skipped (%d in a row)", step, loss_value, self.nonfinite_streak)
        if self.nonfinite_streak >= NONFINITE_LIMIT:
            raise TrainingError(
                f"loss was not finite ({loss_value}) for {NONFINITE_LIMIT} consecutive steps (last: step {step}); "
                "stopped without saving a LoRA from them - lower learning_rate, or train in bf16/fp32 instead of fp16")


def total_steps(config: TrainConfig, plan: data.BatchPlan) -> int:
    return config.max_train_steps if config.max_train_steps > 0 else config.num_train_epochs * plan.steps_per_epoch()


def flush_metrics(metrics_log: metrics.MetricsLog | None) -> None:
    if metrics_log is not None:
        metrics_log.flush()


def stop_everywhere(accelerator, stop: StopFlag) -> bool:
    """All processes must agree to stop at the same step, or collectives would hang."""
    if accelerator.num_processes == 1:
        return stop()
    flag = torch.tensor([1.0 if stop() else 0.0], device=accelerator.device)
    return accelerator.reduce(flag, reduction="sum").item() > 0


def start_accelerator(config: TrainConfig):
    """The accelerator, the training dtype and the output folder (made on the main process)."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    check_gpu_request()  # GPUs asked for but unusable: stop now, not hours later on the CPU
    precision = resolve_precision(config)
    accelerator = Accelerator(mixed_precision=precision, kwargs_handlers=[
        InitProcessGroupKwargs(timeout=timedelta(seconds=config.process_group_timeout))])
    events.set_main_process(accelerator.is_main_process)
    output_dir = Path(config.output_dir)
    model.check_model_folder(config.pretrained_model_name_or_path)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    log.info("device %s, %d process(es), precision %s", accelerator.device, accelerator.num_processes, precision)
    return accelerator, DTYPES[precision], output_dir


def cache_training_set(config: TrainConfig, accelerator, dtype: torch.dtype, stop: StopFlag) -> data.TrainingSet | None:
    """Latents and text embeddings cached once (VAE and text encoders freed afterwards); None: stopped meanwhile."""
    try:
        training_set = data.build_training_set(config, accelerator, dtype, stop)
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = Path(error.filename).parent if error.filename else "the cache folders"
        raise TrainingError(f"cannot write the encode cache in {where}: {error.strerror} (nothing was trained; "
                            "free space there or set cache_dir_vae / text_cache_dir to a larger disk)") from None
    if training_set is None:
        return None
    events.emit("dataset", **training_set.report)
    held = training_set.hold_in_memory(config.cache_ram_budget_mb)
    log.info("data: %s; %s", f"{config.dataloader_prefetch_qlen} micro-batches read ahead"
             if config.dataloader_prefetch_qlen else "no read-ahead (dataloader_prefetch_qlen=0)",
             f"latents + embeddings kept in memory once read ({held / 2**20:.1f} MiB)" if held is not None
             else f"latents + embeddings read per batch (over cache_ram_budget_mb={config.cache_ram_budget_mb})")
    return training_set


def build_model(config: TrainConfig, accelerator, dtype: torch.dtype, max_steps: int):
    """The transformer with its LoRA, the LoRA parameters, AdamW and the learning-rate schedule (prepared)."""
    from diffusers.optimization import get_scheduler

    transformer = model.load_transformer(config.pretrained_model_name_or_path, dtype)
    checkpointing = gradient_checkpointing_wanted(config.gradient_checkpointing, config.resolution)
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    log.info("gradient checkpointing %s", "on" if checkpointing else "off")
    torch.manual_seed(config.seed)  # LoRA initialisation
    parameters = model.add_lora(transformer, config.lora_rank, config.lora_alpha, config.lora_dropout,
                                config.lora_target_modules or LORA_TARGETS[config.lora_target])
    transformer.to(accelerator.device)
    # foreach: each update is one call over all LoRA tensors, not a Python loop over them, with the same
    # arithmetic in the same order (torch picks it by itself for GPU tensors, not for CPU ones)
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                                  weight_decay=config.adam_weight_decay, eps=config.adam_epsilon, foreach=True)
    scheduler_name = config.lr_scheduler
    if scheduler_name == "constant" and config.lr_warmup_steps > 0:
        scheduler_name = "constant_with_warmup"
    lr_scheduler = get_scheduler(scheduler_name, optimizer, num_warmup_steps=config.lr_warmup_steps,
                                 num_training_steps=max_steps, num_cycles=config.lr_num_cycles, power=config.lr_power)
    transformer, optimizer = accelerator.prepare(transformer, optimizer)
    return transformer, parameters, optimizer, lr_scheduler


def resume(config: TrainConfig, output_dir: Path, unwrapped, optimizer, lr_scheduler) -> int:
    """The step to go on from: that of the checkpoint asked for (its LoRA, optimizer, schedule, RNG loaded), or 0."""
    resume_from = checkpoint.resolve_resume(output_dir, config.resume_from_checkpoint)
    if resume_from is None:
        return 0
    state = checkpoint.load_checkpoint(resume_from, unwrapped, optimizer, lr_scheduler)
    for group in optimizer.param_groups:  # a checkpoint of an older trainer says foreach=None
        group["foreach"] = True
    log.info("resumed from %s at step %d", resume_from, state["step"])
    events.emit("resume", step=state["step"], path=str(resume_from))
    return state["step"]


def flow_shift(config: TrainConfig) -> float:
    if config.flow_schedule_shift is not None:
        return config.flow_schedule_shift
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_pretrained(
        config.pretrained_model_name_or_path, subfolder="scheduler", local_files_only=True).config.shift


@dataclass
class RunOutputs:
    """What a run writes besides its steps: checkpoints, validation images, the final LoRA and plot."""

    config: TrainConfig
    accelerator: object
    output_dir: Path
    unwrapped: torch.nn.Module
    optimizer: object
    lr_scheduler: object
    training_set: data.TrainingSet
    dtype: torch.dtype
    metrics_log: metrics.MetricsLog | None

    def save_checkpoint(self, step: int) -> Path | None:
        path = None
        flush_metrics(self.metrics_log)  # a resumed run keeps the records up to its checkpoint
        if self.accelerator.is_main_process:
            try:
                path = checkpoint.save_checkpoint(self.output_dir, step, self.unwrapped, self.optimizer,
                                                  self.lr_scheduler, {"seed": self.config.seed})
                checkpoint.prune(self.output_dir, self.config.checkpoints_total_limit)
                events.emit("checkpoint", step=step, path=str(path))
            except OSError as error:  # e.g. disk full: the previous checkpoint stays the latest
                log.error("checkpoint at step %d failed (%s); previous checkpoints are intact", step, error)
                events.emit("checkpoint_failed", step=step, error=str(error))
        self.accelerator.wait_for_everyone()
        return path

    def validate(self, step: int) -> None:
        config, accelerator = self.config, self.accelerator
        if config.disable_validation or not config.validation_prompts:
            return
        if accelerator.is_main_process:
            for number, path, seed in validation.render(self.unwrapped, config, self.training_set, step,
                                                        accelerator.device, self.dtype, accelerator.autocast):
                extra = {"prompt": number, "seed": seed} if len(config.validation_prompts) > 1 else {}
                events.emit("validation", step=step, path=str(path), **extra)
        accelerator.wait_for_everyone()

    def after_step(self, step: int, max_steps: int) -> None:
        config = self.config
        if config.checkpointing_steps and step % config.checkpointing_steps == 0:
            self.save_checkpoint(step)
        if config.validation_steps and step % config.validation_steps == 0 and step < max_steps:
            self.validate(step)

    def finish(self, max_steps: int, loss: float | None) -> None:
        """The final LoRA (and its ComfyUI copy), the loss plot, the last validation and the `done` event."""
        config, accelerator, output_dir = self.config, self.accelerator, self.output_dir
        if accelerator.is_main_process:
            try:
                lora_file = checkpoint.save_lora(self.unwrapped, output_dir)
                if config.export_comfyui:
                    comfy = checkpoint.save_comfyui_lora(self.unwrapped, output_dir,
                                                         config.lora_alpha or config.lora_rank)
                    log.info("ComfyUI-style LoRA written to %s", comfy)
                records = self.metrics_log.records()
                metrics.plot_loss(records, output_dir / "loss.png")
            except OSError as error:   # e.g. disk full: nothing half written under a final name (temp + rename)
                raise self.final_outputs_error(error) from None
            final_loss = records[-1]["loss"] if records else loss
        self.validate(max_steps)
        if accelerator.is_main_process:
            events.emit("done", lora=str(lora_file), steps=max_steps, final_loss=final_loss)
        accelerator.wait_for_everyone()
        accelerator.end_training()

    def final_outputs_error(self, error: OSError) -> TrainingError:
        kept = checkpoint.list_checkpoints(self.output_dir)
        what = Path(error.filename).name.lstrip(".").removesuffix(".tmp") if error.filename else "the final outputs"
        latest = f"checkpoint-{kept[-1][0]} is the latest complete checkpoint" if kept else "no checkpoint was kept"
        return TrainingError(f"cannot write {what} in {self.output_dir}: {error.strerror or error} ({latest})")


def run_steps(trainer: Trainer, outputs: RunOutputs, stop: StopFlag, start_step: int, max_steps: int,
              profile) -> tuple[int | None, float | None]:
    """Steps start_step + 1 .. max_steps: (EXIT_INTERRUPTED or None, the last loss)."""
    config, accelerator, metrics_log = trainer.config, trainer.accelerator, outputs.metrics_log
    # the micro-batches of the coming steps are prepared in the background
    keys = ((step, micro) for step in range(start_step + 1, max_steps + 1)
            for micro in range(config.gradient_accumulation_steps))
    trainer.batches = data.ReadAhead(trainer.prepare_batch, keys, config.dataloader_prefetch_qlen)
    trainer.profile = profile
    loss = None
    try:
        for step in range(start_step + 1, max_steps + 1):
            if stop_everywhere(accelerator, stop):
                path = outputs.save_checkpoint(step - 1) if step - 1 > start_step else None
                events.emit("interrupted", step=step - 1, checkpoint=str(path) if path else None)
                return EXIT_INTERRUPTED, loss
            profile.begin_step()
            started = time.perf_counter()
            lr = trainer.lr_scheduler.get_last_lr()[0]
            loss = trainer.train_step(step)
            seconds = time.perf_counter() - started
            with profile.phase("logging"):  # buffered: see events.PROGRESS_FLUSH_S and MetricsLog.FLUSH_RECORDS
                events.emit("progress", step=step, max_steps=max_steps, loss=round(loss, 6), lr=lr,
                            s_per_step=round(seconds, 4))
                if metrics_log:
                    metrics_log.append({"step": step, "loss": loss, "lr": lr, "s_per_step": seconds})
            profile.end_step()
            outputs.after_step(step, max_steps)
    finally:
        trainer.batches.close()
        flush_metrics(metrics_log)
    return None, loss


def train(config: TrainConfig, stop: StopFlag, profile=NO_PROFILE) -> int:
    """One training run; `profile` (a profile.StepProfile) times the phases of every step (the benches)."""
    accelerator, dtype, output_dir = start_accelerator(config)
    training_set = cache_training_set(config, accelerator, dtype, stop)
    if training_set is None:
        events.emit("interrupted", step=0, checkpoint=None)
        return EXIT_INTERRUPTED
    plan = data.BatchPlan(training_set.order, config.train_batch_size, config.gradient_accumulation_steps,
                          accelerator.num_processes, config.seed, training_set.buckets)
    max_steps = total_steps(config, plan)
    transformer, parameters, optimizer, lr_scheduler = build_model(config, accelerator, dtype, max_steps)
    unwrapped = accelerator.unwrap_model(transformer)
    start_step = resume(config, output_dir, unwrapped, optimizer, lr_scheduler)
    trainer = Trainer(config, accelerator, transformer, parameters, optimizer, lr_scheduler, training_set, plan, dtype,
                      flow_shift(config))
    metrics_log = metrics.MetricsLog(output_dir / "metrics.jsonl", start_step) if accelerator.is_main_process else None
    outputs = RunOutputs(config, accelerator, output_dir, unwrapped, optimizer, lr_scheduler, training_set, dtype,
                         metrics_log)
    code, loss = run_steps(trainer, outputs, stop, start_step, max_steps, profile)
    if code is not None:
        return code
    outputs.finish(max_steps, loss)
    return 0
