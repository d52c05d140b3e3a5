"""The training loop, on Hugging Face accelerate.

accelerate supplies devices, DDP / DeepSpeed / FSDP (via ``accelerate launch`` or
``torchrun``), mixed precision and gradient clipping; transformers supplies the LR
schedules and gradient checkpointing; PEFT the LoRA/DoRA adapters. What stays here is
what ReMatch needs and the HF Trainer does not give cleanly: a step that computes three
losses in one forward, per-term logging and NaN checks, and checkpoints that resume the
data stream exactly (no replay) and are written atomically.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from rematch.config import Config, ConfigError, dump_yaml
from rematch.losses import OBJECTIVE, objective
from rematch.model import ReMatchModel
from rematch.training.batches import BatchStream, open_source
from rematch.training.gradcache import GradCache
from rematch.training.checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint
from rematch.training.run_directory import (check_resume, check_run_directory, checkpoint_identity,
                                           prepare_run_directory, read_run_id)
from rematch.training.logs import StepLog, plot_losses
from rematch.training.step import ReMatchTrainingModule, freeze_parameters_without_loss


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite; the message names the step and the term."""


@dataclass
class TrainResult:
    model_dir: Path
    steps: int
    seconds: float
    samples_per_second: float
    final_losses: dict[str, float]
    loss_plot: Path | None
    skipped_rows: int


def prepare_model(config: Config, log=None) -> ReMatchModel:
    """The model to train: backbone from config, LoRA or full fine-tuning, optional checkpointing.

    Parameters that no enabled loss term reaches (the projector with matching off, the
    zero-size tokens with K = 0, ...) are frozen here, before DDP wraps the model: see
    :func:`rematch.training.step.freeze_parameters_without_loss`.
    """
    model = ReMatchModel.from_config(config.model)
    if config.lora.enabled:
        model.enable_lora(r=config.lora.r, alpha=config.lora.alpha, dropout=config.lora.dropout,
                          use_dora=config.lora.dora, target_modules=config.lora.target_modules)
    elif config.train.freeze_vision:
        for parameter in model.adapter.core(model.backbone).visual.parameters():
            parameter.requires_grad_(False)
    frozen = freeze_parameters_without_loss(model, config.loss)
    if frozen and log is not None:
        log(f"not trained (no enabled loss term reaches them): {', '.join(frozen)}")
    if config.train.gradient_checkpointing:
        model.adapter.causal_lm(model.backbone).gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def build_optimizer(module: ReMatchTrainingModule, config: Config) -> torch.optim.Optimizer:
    """AdamW with the ReMatch heads (tokens, projector) in their own group and learning rate."""
    heads, backbone = [], []
    for name, parameter in module.model.named_parameters():
        if parameter.requires_grad:
            (backbone if name.startswith("backbone.") else heads).append(parameter)
    groups = [{"params": heads, "lr": config.train.head_lr or config.train.lr, "weight_decay": 0.0}]
    if backbone:
        groups.append({"params": backbone, "lr": config.train.lr, "weight_decay": config.train.weight_decay})
    return torch.optim.AdamW(groups)


def train(config: Config, show_progress: bool = True, log=print) -> TrainResult:
    """Train a ReMatch model as ``config`` says; returns where the final model was saved."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    config.validate()
    out = Path(config.train.out)
    # cpu=True lets accelerate run torchrun-launched CPU processes over gloo (no GPU needed).
    accelerator = Accelerator(mixed_precision=config.train.mixed_precision, cpu=not torch.cuda.is_available())
    set_seed(config.train.seed)
    is_main = accelerator.is_main_process
    sharded = accelerator.distributed_type.name in ("DEEPSPEED", "FSDP")
    if sharded and (config.train.save_every or config.train.resume or config.train.grad_cache_chunk):
        raise ConfigError(f"under {accelerator.distributed_type.name}, resumable checkpoints (train.save_every, "
                          "train.resume) and GradCache (train.grad_cache_chunk) are not supported yet; set them "
                          "to 0/false, or use plain DDP (the paper's LoRA recipes fit without sharding)")
    check_run_directory(config)  # every process, before anything is written
    accelerator.wait_for_everyone()
    run_id = prepare_run_directory(config, log) if is_main else None
    accelerator.wait_for_everyone()
    if is_main:
        dump_yaml(config, out / "config.yaml")

    model = prepare_model(config, log=log if is_main else None)
    module = ReMatchTrainingModule(model, config.loss, seed=config.train.seed)
    optimizer = build_optimizer(module, config)
    warmup = int(config.train.warmup_ratio * config.train.steps)
    scheduler = get_scheduler(config.train.scheduler, optimizer, num_warmup_steps=warmup,
                              num_training_steps=config.train.steps)
    module, optimizer = accelerator.prepare(module, optimizer)
    unwrapped: ReMatchTrainingModule = accelerator.unwrap_model(module)
    grad_cache = GradCache(unwrapped, config.train.grad_cache_chunk) if config.train.grad_cache_chunk else None

    with accelerator.main_process_first():  # the main process generates built-in data once
        source = open_source(config, out, log=log if is_main else (lambda *_: None),
                             world_size=accelerator.num_processes)
    start_step = 0
    checkpoints = out / "checkpoints"
    if config.train.resume:
        found = latest_checkpoint(checkpoints, log=log)
        if found is not None:
            state = load_checkpoint(found, unwrapped, optimizer, scheduler, rank=accelerator.process_index)
            check_resume(state.extra, read_run_id(out), config, state.step, found, log=log if is_main else
                         (lambda *_: None))
            source.load_state_dict(state.data_state)
            start_step = state.step
            log(f"resumed from {found} at step {start_step}")
        else:
            log(f"no complete checkpoint in {checkpoints}: starting from step 0")

    from rematch.data.collate import TrainCollator

    collator = TrainCollator(model, skip_bad=config.data.skip_bad, report=getattr(source, "report", None),
                             with_negatives=config.loss.hard_negatives, matching=bool(config.loss.matching))
    stream = BatchStream(source, collator, config.train.batch_size, rank=accelerator.process_index,
                         world_size=accelerator.num_processes, workers=max(1, config.data.num_workers))
    step_log = StepLog(out, resume_step=start_step) if is_main else None
    samples_per_step = config.train.batch_size * accelerator.num_processes
    trainable = [p for p in module.parameters() if p.requires_grad]
    progress = tqdm(total=config.train.steps, initial=start_step, disable=not (show_progress and is_main),
                    desc="train", unit="step")
    started = time.perf_counter()
    last_terms: dict[str, float] = {}
    last_data_state = source.state_dict()
    try:
        for step in range(start_step, config.train.steps):
            step_batch = next(stream)
            module.train()
            if grad_cache is not None:
                with accelerator.autocast():
                    terms = grad_cache.step(step_batch.batch, step)
            else:
                terms = module(step_batch.batch, step)
            values = {name: float(value.detach()) for name, value in terms.items() if name != OBJECTIVE}
            for name, value in values.items():
                if not math.isfinite(value):
                    raise NonFiniteLossError(f"step {step + 1}: loss term '{name}' is {value}; stopping "
                                             f"(last finite losses: {last_terms})")
            if grad_cache is None:
                accelerator.backward(objective(terms))
            grad_norm = None
            if config.train.max_grad_norm:
                grad_norm = float(accelerator.clip_grad_norm_(trainable, config.train.max_grad_norm))
                if not math.isfinite(grad_norm):
                    raise NonFiniteLossError(f"step {step + 1}: gradient norm is {grad_norm}")
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            last_terms = values
            last_data_state = step_batch.data_state
            done = step + 1
            if is_main and (done % config.train.log_every == 0 or done == config.train.steps):
                elapsed = time.perf_counter() - started
                row: dict[str, Any] = {"step": done, **{k: round(v, 6) for k, v in values.items()},
                                       "lr": scheduler.get_last_lr()[-1],
                                       "samples_per_s": round(samples_per_step * (done - start_step) / elapsed, 3)}
                if grad_norm is not None:
                    row["grad_norm"] = round(grad_norm, 6)
                step_log.append(row)
            progress.set_postfix({k[:5]: f"{v:.3f}" for k, v in values.items()})
            progress.update(1)
            if config.train.save_every and done % config.train.save_every == 0 and done < config.train.steps:
                _checkpoint(accelerator, checkpoints, done, unwrapped, optimizer, scheduler, step_batch.data_state,
                            config, run_id)
    finally:
        progress.close()
        stream.close()
    seconds = time.perf_counter() - started
    if not sharded:  # the final state, so a later run can continue with more steps
        _checkpoint(accelerator, checkpoints, config.train.steps, unwrapped, optimizer, scheduler,
                    last_data_state, config, run_id)
    model_dir = out / "model"
    plot = None
    skipped = 0
    report = getattr(source, "report", None)
    if report is not None and hasattr(report, "total"):
        skipped = int(report.total)
    if is_main:
        unwrapped.model.save_pretrained(model_dir)
        if config.train.plot and step_log.rows:
            plot = plot_losses(step_log.rows, out / "loss_curves.png")
        step_log.close()
        trained_steps = config.train.steps - start_step
        summary = {
            "steps": config.train.steps, "resumed_from": start_step, "seconds": round(seconds, 2),
            "samples_per_second": round(samples_per_step * trained_steps / seconds, 3) if seconds else None,
            "final_losses": last_terms, "processes": accelerator.num_processes,
            "skipped_rows": skipped, "model_dir": str(model_dir),
            "config": dataclasses.asdict(config),
        }
        if report is not None and hasattr(report, "summary"):
            summary["bad_rows"] = report.summary()
            if skipped:
                log(f"skipped {skipped} bad rows: {report.summary()}")
        (out / "train_summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    accelerator.wait_for_everyone()
    trained = config.train.steps - start_step
    return TrainResult(model_dir=model_dir, steps=config.train.steps, seconds=seconds,
                       samples_per_second=samples_per_step * trained / seconds if seconds else 0.0,
                       final_losses=last_terms, loss_plot=plot, skipped_rows=skipped)


def _checkpoint(accelerator, root: Path, step: int, module, optimizer, scheduler, data_state, config: Config,
                run_id: str | None) -> None:
    """Gather every process's RNG state, then let the main process write the checkpoint."""
    states = [rng_state()]
    if accelerator.num_processes > 1:
        gathered: list = [None] * accelerator.num_processes
        torch.distributed.all_gather_object(gathered, states[0])
        states = gathered
    if accelerator.is_main_process:
        save_checkpoint(root, step, module, optimizer, scheduler, data_state, states,
                        extra={"world_size": accelerator.num_processes, **checkpoint_identity(run_id, config)},
                        keep_last=config.train.keep_last)
    accelerator.wait_for_everyone()
