"""Training checkpoints: atomic, self-checking, and enough to resume exactly.

A checkpoint directory ``checkpoints/step-00000100/`` holds the trainable weights (frozen
base weights are rebuilt from the config, so a LoRA checkpoint stays small), the
optimizer and scheduler states, every process's RNG states, the data stream's position
and a ``MANIFEST.json`` written last that lists every file with its size. It is built in
a temporary directory and renamed into place, so a crash (even SIGKILL) mid-save leaves
either no new checkpoint or a complete one. On resume, directories without a manifest,
or whose files do not match it, are reported and skipped, never loaded.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from rematch.atomic import write_directory_atomically

PREFIX = "step-"
MANIFEST = "MANIFEST.json"
TRAINABLE = "trainable.safetensors"


@dataclass
class ResumeState:
    step: int
    data_state: dict[str, Any]
    extra: dict[str, Any]


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain numbers only, so that loading them
    needs no unpickling of arbitrary objects (``torch.load(weights_only=True)``)."""
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    python, numpy_state = state["python"], state["numpy"]
    random.setstate((python["version"], tuple(python["internal"].tolist()), python["gauss"]))
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"],
                         numpy_state["has_gauss"], numpy_state["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file holds something other than tensors and plain values (never unpickled)."""


def load_plain(path: Path) -> Any:
    """``torch.load`` restricted to tensors and plain Python values: a checkpoint may come from
    someone else, and unpickling arbitrary objects runs their code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpointError(f"{path}: holds objects other than tensors and plain values; refusing to "
                                    f"load it (rematch never unpickles code from a checkpoint). Detail: "
                                    f"{str(error).splitlines()[0]}") from error


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().contiguous() for name, p in module.named_parameters() if p.requires_grad}


def save_checkpoint(root: Path, step: int, module: torch.nn.Module, optimizer, scheduler,
                    data_state: dict[str, Any], rng_states: list[dict[str, Any]],
                    extra: dict[str, Any] | None = None, keep_last: int = 2) -> Path:
    """Write ``root/step-NNNNNNNN`` atomically (call on the main process only) and prune old ones."""
    target = root / f"{PREFIX}{step:08d}"
    weights = trainable_state(module)

    def write(directory: Path) -> None:
        save_file(weights, str(directory / TRAINABLE))
        torch.save(optimizer.state_dict(), directory / "optimizer.pt")
        _fault_injection_point(step)
        torch.save(scheduler.state_dict(), directory / "scheduler.pt")
        torch.save(rng_states, directory / "rng.pt")
        (directory / "state.json").write_text(json.dumps(
            {"step": step, "data_state": data_state, "extra": extra or {}}, indent=2), encoding="utf-8")
        files = {path.name: path.stat().st_size for path in sorted(directory.iterdir())}
        (directory / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=2), encoding="utf-8")

    # step-N under checkpoints/ is ours by construction (a re-save of the same step replaces it)
    write_directory_atomically(target, write, is_ours=lambda _: True, what="a checkpoint")
    prune_checkpoints(root, keep_last)
    return target


def save_distributed_checkpoint(accelerator, root: Path, step: int, module: torch.nn.Module, optimizer, scheduler,
                                data_state: dict[str, Any], extra: dict[str, Any], keep_last: int = 2) -> None:
    """Every process calls this: their RNG states are gathered (an exact resume restores each
    process's own), then the main process writes the checkpoint and all wait for it, so no
    process runs ahead into a step the checkpoint does not cover."""
    states = [rng_state()]
    if accelerator.num_processes > 1:
        gathered: list = [None] * accelerator.num_processes
        torch.distributed.all_gather_object(gathered, states[0])
        states = gathered
    if accelerator.is_main_process:
        save_checkpoint(root, step, module, optimizer, scheduler, data_state, states, extra=extra, keep_last=keep_last)
    accelerator.wait_for_everyone()


def _fault_injection_point(step: int) -> None:
    """Test hook: ``REMATCH_KILL_DURING_SAVE=<step>`` SIGKILLs this process halfway through
    writing that step's checkpoint, which is how the tests prove saves are atomic."""
    if os.environ.get("REMATCH_KILL_DURING_SAVE") == str(step):
        os.kill(os.getpid(), signal.SIGKILL)


def checkpoint_problem(directory: Path) -> str | None:
    """Why ``directory`` is not a loadable checkpoint, or None if it is complete."""
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return "no MANIFEST.json (the save did not finish)"
    try:
        listed = json.loads(manifest.read_text(encoding="utf-8"))["files"]
    except (json.JSONDecodeError, KeyError) as error:
        return f"unreadable MANIFEST.json ({error})"
    for name, size in listed.items():
        path = directory / name
        if not path.is_file():
            return f"missing file {name}"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, the manifest says {size}"
    return None


def list_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def remove_interrupted_saves(root: Path, log=print) -> None:
    """Delete temporary directories left by a save that was killed before its rename."""
    if not root.is_dir():
        return
    for leftover in root.glob(f".{PREFIX}*.tmp-*"):
        log(f"removing the remains of an interrupted checkpoint save: {leftover}")
        shutil.rmtree(leftover, ignore_errors=True)


def latest_checkpoint(root: Path, log=print) -> Path | None:
    """The newest complete checkpoint under ``root``; incomplete or corrupt ones are reported and skipped."""
    remove_interrupted_saves(root, log)
    for directory in reversed(list_checkpoints(root)):
        problem = checkpoint_problem(directory)
        if problem is None:
            return directory
        log(f"skipping checkpoint {directory}: {problem}")
    return None


def prune_checkpoints(root: Path, keep_last: int) -> None:
    complete = [p for p in list_checkpoints(root) if checkpoint_problem(p) is None]
    for directory in complete[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(directory, ignore_errors=True)


def load_checkpoint(directory: Path, module: torch.nn.Module, optimizer, scheduler, rank: int = 0) -> ResumeState:
    """Restore weights, optimizer, scheduler and this process's RNG; return the step and data position."""
    problem = checkpoint_problem(directory)
    if problem is not None:
        raise RuntimeError(f"checkpoint {directory} is not complete: {problem}")
    weights = load_file(str(directory / TRAINABLE))
    expected = {name for name, p in module.named_parameters() if p.requires_grad}
    if set(weights) != expected:
        missing, unexpected = sorted(expected - set(weights))[:5], sorted(set(weights) - expected)[:5]
        raise RuntimeError(f"checkpoint {directory} does not fit this model: missing {missing}, "
                           f"unexpected {unexpected} (was it written with another config?)")
    parameters = dict(module.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            parameters[name].copy_(value)
    optimizer.load_state_dict(load_plain(directory / "optimizer.pt"))
    scheduler.load_state_dict(load_plain(directory / "scheduler.pt"))
    rng_states = load_plain(directory / "rng.pt")
    set_rng_state(rng_states[min(rank, len(rng_states) - 1)])
    state = json.loads((directory / "state.json").read_text(encoding="utf-8"))
    return ResumeState(step=state["step"], data_state=state["data_state"], extra=state.get("extra", {}))
