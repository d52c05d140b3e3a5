"""What a kind of training run gives the one training loop: its objective.

``rematch train`` and ``rematch pretrain`` run the same loop (:mod:`rematch.training.runner`:
accelerator, seeding, optimiser and schedule, clipping, the stop on a non-finite loss,
atomic checkpoints with exact resume, the step log and plot, the summary). They differ in
what is trained, on which data and with which loss, which is what an :class:`Objective`
says: a module whose forward computes the loss terms, its parameter groups, the resumable
data stream and its collate function, a step function that turns a batch into named loss
terms, and how the trained model is saved. A few optional fields cover what only one
kind of run has (a per-group learning-rate schedule, an evaluation during the run, extra
summary fields, the loss plot's panels).

Plain data and callables, no base class: each command builds one in a function
(:func:`rematch.training.loop.embedding_objective`,
:func:`rematch.training.pretrain.pretraining_objective`), closing over its own config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch
from torch import nn

from rematch.training.logs import LOSS_TERMS, Panel


@dataclass
class StepOutput:
    """What one training step computed, for the loop to check, backpropagate and log."""

    losses: dict[str, float]
    """The named loss terms as plain numbers, the same on every process (so that all of
    them stop together on a non-finite one): checked, logged and reported as the final losses."""
    backward: torch.Tensor | None
    """The tensor to backpropagate; None when the step already did its backward passes (GradCache)."""
    metrics: dict[str, Any] = field(default_factory=dict)
    """Further step-log columns (the phase's objective, accuracies), after the learning rate and throughput."""


class Evaluation(Protocol):
    """A measurement taken during the run (pre-training's held-out accuracy), on the main process."""

    every: int
    """Measure every this many steps and after the last one."""

    def measure(self, step: int) -> str:
        """Measure after ``step`` steps, record it, and return one line for the log."""

    def close(self) -> None:
        ...


@dataclass
class RunContext:
    """What the loop knows when it asks for the objective: the accelerator (processes, rank,
    devices), the run directory, and a log that only the main process writes to."""

    accelerator: Any
    out: Path
    log: Callable[[str], None]

    @property
    def processes(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def sharded(self) -> bool:
        """Parameters sharded across processes (DeepSpeed, FSDP): no resumable checkpoints yet."""
        return self.accelerator.distributed_type.name in ("DEEPSPEED", "FSDP")

    def mean_over_processes(self, value: torch.Tensor) -> float:
        """The mean of a scalar over every process (a collective: every rank must call it)."""
        value = value.detach()
        if self.processes > 1:
            value = self.accelerator.reduce(value, "mean")
        return float(value)


@dataclass
class Objective:
    """One kind of training run, as the loop sees it (see the module docstring)."""

    module: nn.Module
    """Computes the loss terms in its forward: the module accelerate wraps (DDP synchronises
    gradients only through ``forward``); checkpoints hold its trainable parameters."""
    parameter_groups: list[dict[str, Any]]
    """AdamW's parameter groups, each with its learning rate and weight decay."""
    source: Any
    """The examples, forever, in a resumable order: iterable, with ``state_dict()`` and
    ``load_state_dict()`` (the position a checkpoint stores)."""
    collate: Callable[[list], Any]
    """One process's examples of a step -> the batch :attr:`step` takes (runs in threads)."""
    step: Callable[[nn.Module, Any, int], StepOutput]
    """``step(module, batch, index)``: the forward of the (wrapped) module on a batch at step ``index``."""
    save_model: Callable[[Path, list[dict[str, Any]], float], None]
    """``save_model(directory, step_log_rows, seconds)``: the trained model, on the main process, at the end."""
    workers: int = 1
    """Threads collating batches ahead of the step."""
    lr_lambdas: list[Callable[[int], float]] | None = None
    """One learning-rate factor per parameter group and step (a curriculum's phases); None:
    ``train.scheduler`` with ``train.warmup_ratio``."""
    summary: Callable[[], dict[str, Any]] = dict
    """Fields the run summary (``train_summary.json``) adds to the loop's own."""
    open_evaluation: Callable[[int], Evaluation] | None = None
    """``open_evaluation(start_step)``: an :class:`Evaluation` to run during the run, or None."""
    plot_title: str = "training losses"
    plot_terms: Sequence[Panel] = LOSS_TERMS
    """The loss plot's panels: a step-log column each, or a title with the columns it draws together."""
