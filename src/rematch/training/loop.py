"""``rematch train``: a ReMatch model on the training source, with ReMatch's three losses.

The loop itself (accelerate, resume, checkpoints, logs, the summary) is
:func:`rematch.training.runner.run_loop`, shared with ``rematch pretrain``; this module says
what ``train`` trains: the model as the config builds it (LoRA or full fine-tuning), the
step of :class:`~rematch.training.step.ReMatchTrainingModule` (one forward, three loss
terms, or GradCache's chunked passes), the training source with its bad-row report, and
the saved ReMatch model directory. (The module keeps its name because ``rematch train``,
the demo and the benchmarks import :func:`train` from here.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from rematch.config import Config, ConfigError
from rematch.losses import OBJECTIVE, objective
from rematch.model import ReMatchModel
from rematch.training.batches import open_source
from rematch.training.collate import TrainCollator
from rematch.training.gradcache import GradCache
from rematch.training.logs import LOSS_TERMS
from rematch.training.matching_diagnostics import VIEW_PANELS, split_view_metrics
from rematch.training.objective import Objective, RunContext, StepOutput
from rematch.training.runner import run_loop
from rematch.training.step import ReMatchTrainingModule, freeze_parameters_without_loss


@dataclass
class TrainResult:
    model_dir: Path
    steps: int
    seconds: float
    samples_per_second: float
    final_losses: dict[str, float]
    loss_plot: Path | None
    skipped_rows: int


def prepare_model(config: Config, log: Callable[[str], None] | None = None) -> ReMatchModel:
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


def parameter_groups(module: ReMatchTrainingModule, config: Config) -> list[dict[str, Any]]:
    """AdamW's groups: the ReMatch heads (tokens, projector) in their own, with their own learning rate."""
    heads, backbone = [], []
    for name, parameter in module.model.named_parameters():
        if parameter.requires_grad:
            (backbone if name.startswith("backbone.") else heads).append(parameter)
    groups = [{"params": heads, "lr": config.train.head_lr or config.train.lr, "weight_decay": 0.0}]
    if backbone:
        groups.append({"params": backbone, "lr": config.train.lr, "weight_decay": config.train.weight_decay})
    return groups


def train(config: Config, show_progress: bool = True, log: Callable[[str], None] = print) -> TrainResult:
    """Train a ReMatch model as ``config`` says; returns where the final model was saved."""
    result = run_loop(config, lambda context: embedding_objective(config, context), name="train",
                      show_progress=show_progress, log=log)
    return TrainResult(model_dir=result.model_dir, steps=result.steps, seconds=result.seconds,
                       samples_per_second=result.samples_per_second, final_losses=result.final_losses,
                       loss_plot=result.loss_plot, skipped_rows=result.summary["skipped_rows"])


def embedding_objective(config: Config, context: RunContext) -> Objective:
    """What ``rematch train`` trains: built after seeding, in this order (model, data), so a
    seed gives the same initial weights and batches as always."""
    train = config.train
    if context.sharded and train.grad_cache_chunk:
        raise ConfigError(f"under {context.accelerator.distributed_type.name}, GradCache (train.grad_cache_chunk) is "
                          "not supported yet; set it to 0, or use plain DDP")
    model = prepare_model(config, log=context.log)
    module = ReMatchTrainingModule(model, config.loss, seed=train.seed)
    grad_cache = GradCache(module, train.grad_cache_chunk) if train.grad_cache_chunk else None
    with context.accelerator.main_process_first():  # the main process generates built-in data once
        source = open_source(config, context.out, log=context.log, world_size=context.processes)
    report = getattr(source, "report", None)

    def step(wrapped: torch.nn.Module, batch: Any, index: int) -> StepOutput:
        if grad_cache is not None:  # it runs its own backward passes, chunk by chunk
            with context.accelerator.autocast():
                terms = grad_cache.step(batch, index)
        else:
            terms = wrapped(batch, index)
        loss_terms, view_metrics = split_view_metrics(terms)  # per-view matching: logged, not optimised
        losses = {name: float(value.detach()) for name, value in loss_terms.items() if name != OBJECTIVE}
        return StepOutput(losses, backward=None if grad_cache is not None else objective(terms),
                          metrics=view_metrics)

    def summary() -> dict[str, Any]:
        skipped = int(report.total) if report is not None and hasattr(report, "total") else 0
        fields: dict[str, Any] = {"skipped_rows": skipped}
        if report is not None and hasattr(report, "summary"):
            fields["bad_rows"] = report.summary()
            if skipped:
                context.log(f"skipped {skipped} bad rows: {report.summary()}")
        return fields

    return Objective(
        module=module, parameter_groups=parameter_groups(module, config), source=source,
        collate=TrainCollator(model, skip_bad=config.data.skip_bad, report=report,
                              with_negatives=config.loss.hard_negatives, matching=bool(config.loss.matching)),
        step=step, save_model=lambda directory, rows, seconds: model.save_pretrained(directory),
        workers=config.data.num_workers, summary=summary,
        plot_terms=(*LOSS_TERMS, *(VIEW_PANELS if config.loss.matching else ())))
