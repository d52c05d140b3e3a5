"""The training loop, on Hugging Face accelerate: one for ``rematch train`` and ``rematch pretrain``.

accelerate supplies devices, DDP / DeepSpeed / FSDP (via ``accelerate launch`` or
``torchrun``), mixed precision and gradient clipping; transformers the LR schedules. What
stays here is what the HF Trainer does not give cleanly and both commands need the same:
per-term logging and a stop at the first non-finite loss, checkpoints written atomically
that resume the data stream, RNG, optimizer and schedule exactly (no replay), the
run-directory rules, and the summary. What is trained, on what and with which loss comes
from an :class:`~rematch.training.objective.Objective`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from rematch.config import ConfigError, dump_yaml
from rematch.training.batches import BatchStream
from rematch.training.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_distributed_checkpoint
from rematch.training.logs import StepLog, plot_losses
from rematch.training.objective import Objective, RunContext, StepOutput
from rematch.training.run_directory import (check_resume, check_run_directory, checkpoint_identity,
                                           prepare_run_directory, read_run_id, seal_run_directory)


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite; the message names the step and the term."""


@dataclass
class LoopResult:
    model_dir: Path
    steps: int
    """The steps trained up to (``train.steps``, or ``stop_after``)."""
    resumed_from: int
    seconds: float
    samples_per_second: float
    final_losses: dict[str, float]
    loss_plot: Path | None
    summary: dict[str, Any]
    """The objective's own summary fields (every process has them, the main one wrote them)."""


def run_loop(config: Any, build: Callable[[RunContext], Objective], *, name: str, show_progress: bool = True,
             log: Callable[[str], None] = print, stop_after: int | None = None,
             find_unused_parameters: bool = False) -> LoopResult:
    """Train ``build(context)``'s objective as ``config`` (a root config whose ``train`` section
    is a :class:`rematch.config.LoopConfig`) says; ``name`` labels the progress bar.

    ``stop_after`` trains only the first steps of the schedule and writes their log and a
    checkpoint, no model and no summary (how a test replays the start of a long recipe).
    ``find_unused_parameters`` is for objectives whose steps leave some parameters without a
    gradient (DDP then searches the graph every step).
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed

    config.validate()
    train, out = config.train, Path(config.train.out)
    if stop_after is not None and not 1 <= stop_after <= train.steps:
        raise ConfigError(f"stop_after must be within 1..train.steps ({train.steps}), got {stop_after}")
    last_step = train.steps if stop_after is None else stop_after
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if find_unused_parameters else []
    # cpu=True lets accelerate run torchrun-launched CPU processes over gloo (no GPU needed).
    accelerator = Accelerator(mixed_precision=train.mixed_precision, cpu=not torch.cuda.is_available(),
                              kwargs_handlers=handlers)
    set_seed(train.seed)
    is_main = accelerator.is_main_process
    quiet = log if is_main else (lambda *_: None)
    context = RunContext(accelerator, out, quiet)
    if context.sharded and (train.save_every or train.resume):
        raise ConfigError(f"under {accelerator.distributed_type.name}, resumable checkpoints (train.save_every, "
                          "train.resume) are not supported yet; set them to 0/false, or use plain DDP (the "
                          "paper's LoRA recipes fit without sharding)")
    check_run_directory(config, name)  # every process, before anything is written
    accelerator.wait_for_everyone()
    run_id = prepare_run_directory(config, log, name) if is_main else None
    accelerator.wait_for_everyone()
    if is_main:
        dump_yaml(config, out / "config.yaml")

    objective = build(context)
    check_batch_fits_data(objective.source, train.batch_size, accelerator.num_processes)
    optimizer = torch.optim.AdamW(objective.parameter_groups)
    scheduler = _schedule(optimizer, objective, train)
    module, optimizer = accelerator.prepare(objective.module, optimizer)
    unwrapped = accelerator.unwrap_model(module)
    checkpoints = out / "checkpoints"
    start_step = _resume(config, checkpoints, accelerator, unwrapped, optimizer, scheduler, objective.source, log)

    def checkpoint(step: int, data_state: dict[str, Any]) -> None:
        save_distributed_checkpoint(accelerator, checkpoints, step, unwrapped, optimizer, scheduler, data_state,
                                    extra={"world_size": accelerator.num_processes,
                                           **checkpoint_identity(run_id, config)},
                                    keep_last=train.keep_last)

    stream = BatchStream(objective.source, objective.collate, train.batch_size, rank=accelerator.process_index,
                         world_size=accelerator.num_processes, workers=max(1, objective.workers))
    step_log = StepLog(out, resume_step=start_step) if is_main else None
    evaluation = objective.open_evaluation(start_step) if is_main and objective.open_evaluation else None
    samples_per_step = train.batch_size * accelerator.num_processes
    trainable = [p for p in module.parameters() if p.requires_grad]
    progress = tqdm(total=train.steps, initial=start_step, disable=not (show_progress and is_main), desc=name,
                    unit="step")
    started = time.perf_counter()
    last_losses: dict[str, float] = {}
    last_data_state = objective.source.state_dict()
    try:
        for step in range(start_step, last_step):
            step_batch = next(stream)
            module.train()
            output = objective.step(module, step_batch.batch, step)
            _check_finite(output, step, last_losses)
            if output.backward is not None:
                accelerator.backward(output.backward)
            grad_norm = None
            if train.max_grad_norm:
                grad_norm = float(accelerator.clip_grad_norm_(trainable, train.max_grad_norm))
                if not math.isfinite(grad_norm):
                    raise NonFiniteLossError(f"step {step + 1}: gradient norm is {grad_norm}")
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            last_losses, last_data_state, done = output.losses, step_batch.data_state, step + 1
            if is_main and (done % train.log_every == 0 or done == train.steps):
                samples_per_s = samples_per_step * (done - start_step) / (time.perf_counter() - started)
                step_log.append(_log_row(done, output, scheduler.get_last_lr()[-1], samples_per_s, grad_norm))
            if evaluation is not None and (done % evaluation.every == 0 or done == train.steps):
                quiet(evaluation.measure(done))
            progress.set_postfix({k[:5]: f"{v:.3f}" for k, v in output.losses.items()})
            progress.update(1)
            if train.save_every and done % train.save_every == 0 and done < train.steps:
                checkpoint(done, step_batch.data_state)
    finally:
        progress.close()
        stream.close()
        if evaluation is not None:
            evaluation.close()
    seconds = time.perf_counter() - started
    if not context.sharded:  # the final state, so a later run can continue with more steps
        checkpoint(last_step, last_data_state)
    model_dir, plot = out / "model", None
    samples_per_second = samples_per_step * (last_step - start_step) / seconds if seconds else 0.0
    summary = objective.summary()
    if is_main and last_step == train.steps:
        rows = list(step_log.rows)
        objective.save_model(model_dir, rows, seconds)
        if train.plot and rows:
            plot = plot_losses(rows, out / "loss_curves.png", title=objective.plot_title, terms=objective.plot_terms)
        (out / "train_summary.json").write_text(json.dumps({
            "steps": train.steps, "resumed_from": start_step, "seconds": round(seconds, 2),
            "samples_per_second": round(samples_per_second, 3) if seconds else None,
            "final_losses": last_losses, "processes": accelerator.num_processes, "model_dir": str(model_dir),
            **summary, "config": dataclasses.asdict(config)}, indent=2), encoding="utf-8")
    if is_main:
        step_log.close()
        seal_run_directory(out, name)
    accelerator.wait_for_everyone()
    return LoopResult(model_dir=model_dir, steps=last_step, resumed_from=start_step, seconds=seconds,
                      samples_per_second=samples_per_second, final_losses=last_losses, loss_plot=plot,
                      summary=summary)


def check_batch_fits_data(source: Any, batch_size: int, processes: int) -> None:
    """A global batch larger than the training data would repeat rows within one step (and a
    huge one filled the memory first); a source of unknown size (an endless stream) passes."""
    try:
        rows = len(source)
    except TypeError:
        return
    if batch_size * processes > rows:
        per = f" ({batch_size} per process x {processes})" if processes > 1 else ""
        raise ConfigError(f"train.batch_size {batch_size * processes}{per} is larger than the training data "
                          f"({rows} rows): use at most {max(1, rows // processes)} per process, or more data")


def _schedule(optimizer: torch.optim.Optimizer, objective: Objective, train) -> Any:
    """The objective's per-group schedule, else ``train.scheduler`` with its warm-up."""
    if objective.lr_lambdas is not None:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, objective.lr_lambdas)
    from transformers import get_scheduler

    return get_scheduler(train.scheduler, optimizer, num_warmup_steps=int(train.warmup_ratio * train.steps),
                         num_training_steps=train.steps)


def _resume(config: Any, checkpoints: Path, accelerator, module, optimizer, scheduler, source,
            log: Callable[[str], None]) -> int:
    """With ``train.resume``, restore the newest complete checkpoint (weights, optimizer,
    schedule, this process's RNG, the data position); return the step to continue from."""
    if not config.train.resume:
        return 0
    quiet = log if accelerator.is_main_process else (lambda *_: None)
    found = latest_checkpoint(checkpoints, log=log)
    if found is None:
        quiet(f"no complete checkpoint in {checkpoints}: starting from step 0")
        return 0
    state = load_checkpoint(found, module, optimizer, scheduler, rank=accelerator.process_index)
    check_resume(state.extra, read_run_id(Path(config.train.out)), config, state.step, found, log=quiet)
    try:
        source.load_state_dict(state.data_state)
    except (AttributeError, KeyError, TypeError, ValueError, IndexError) as error:
        raise CheckpointError(f"{found / 'state.json'}: its data position (data_state) cannot be restored "
                              f"({type(error).__name__}: {error}); the file was edited or is damaged, delete "
                              f"checkpoint {found.name} to resume from an earlier one") from None
    quiet(f"resumed from {found} at step {state.step}")
    return state.step


def _check_finite(output: StepOutput, step: int, last: dict[str, float]) -> None:
    for term, value in output.losses.items():
        if not math.isfinite(value):
            raise NonFiniteLossError(f"step {step + 1}: loss term '{term}' is {value}; stopping (last finite "
                                     f"losses: {last})")


def _log_row(done: int, output: StepOutput, lr: float, samples_per_s: float,
             grad_norm: float | None) -> dict[str, Any]:
    row: dict[str, Any] = {"step": done, **{k: round(v, 6) for k, v in output.losses.items()}, "lr": lr,
                           "samples_per_s": round(samples_per_s, 3), **output.metrics}
    if grad_norm is not None:
        row["grad_norm"] = round(grad_norm, 6)
    return row
