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

import hashlib
import json
import os
import pickle
import random
import re
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


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed as it is: a file changed since it was saved, a state
    that disagrees with its directory, a data position that is not one."""


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (a full disk, a quota): one line, not torch's stream-writer traceback."""


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


def persistent_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Buffers that are part of the module's state (not the non-persistent ones, e.g. rotary
    tables): training state that is not a parameter, such as the projector's running centre,
    which a resume must restore as exactly as the weights."""
    saved = set(module.state_dict(keep_vars=True))
    return {name: buffer for name, buffer in module.named_buffers() if name in saved}


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint holds of the model: every trainable parameter and every persistent buffer."""
    state = {name: p.detach().cpu().contiguous() for name, p in module.named_parameters() if p.requires_grad}
    state.update({name: b.detach().cpu().contiguous() for name, b in persistent_buffers(module).items()})
    return state


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
        paths = sorted(directory.iterdir())
        files = {path.name: path.stat().st_size for path in paths}
        checksums = {path.name: _checksum(path) for path in paths}  # resume refuses bytes changed since
        (directory / MANIFEST).write_text(json.dumps({"step": step, "files": files, "checksums": checksums},
                                                     indent=2), encoding="utf-8")

    # step-N under checkpoints/ is ours by construction (a re-save of the same step replaces it)
    try:
        write_directory_atomically(target, write, is_ours=lambda _: True, what="a checkpoint")
    except OSError as error:
        raise CheckpointWriteError(f"cannot write checkpoint {target}: {error.strerror or error}; free some space "
                                   "(or choose another --out), then continue with --resume") from error
    except Exception as error:  # noqa: BLE001 - torch.save and safetensors report a failed write their own way
        if not _WRITE_FAILURE.search(str(error)):
            raise
        raise CheckpointWriteError(f"cannot write checkpoint {target}: {str(error).splitlines()[0]}; is the disk "
                                   "full? Free some space, then continue with --resume") from error
    prune_checkpoints(root, keep_last)
    return target


#: How torch.save (RuntimeError: "file write failed", "unexpected pos") and safetensors
#: (SafetensorError: "I/O error: ... (os error 28)") say a write to the disk failed.
_WRITE_FAILURE = re.compile(r"write failed|failed writing|unexpected pos|I/O error|os error \d+|No space left", re.I)


def _checksum(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
        raise CheckpointError(f"checkpoint {directory} is not complete: {problem}")
    state = read_state(directory)
    verify_checksums(directory)
    weights = load_file(str(directory / TRAINABLE))
    buffers = persistent_buffers(module)
    expected = {name for name, p in module.named_parameters() if p.requires_grad} | set(buffers)
    if set(weights) != expected:
        missing, unexpected = sorted(expected - set(weights))[:5], sorted(set(weights) - expected)[:5]
        raise CheckpointError(f"checkpoint {directory} does not fit this model: missing {missing}, "
                           f"unexpected {unexpected} (was it written with another config?)")
    tensors = {**dict(module.named_parameters()), **buffers}
    with torch.no_grad():
        for name, value in weights.items():
            tensors[name].copy_(value)
    optimizer.load_state_dict(load_plain(directory / "optimizer.pt"))
    scheduler.load_state_dict(load_plain(directory / "scheduler.pt"))
    rng_states = load_plain(directory / "rng.pt")
    set_rng_state(rng_states[min(rank, len(rng_states) - 1)])
    return ResumeState(step=state["step"], data_state=state["data_state"], extra=state.get("extra", {}))


def step_of(directory: Path) -> int:
    """The step a checkpoint directory's name says (``step-00000100`` -> 100)."""
    return int(directory.name[len(PREFIX):])


def read_state(directory: Path) -> dict[str, Any]:
    """``state.json``, checked: a JSON object whose step agrees with the directory's name and its
    manifest, with a data position and run record that are objects."""
    where = directory / "state.json"
    try:
        state = json.loads(where.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise CheckpointError(f"{where}: unreadable ({error}); delete checkpoint {directory.name} to resume from "
                              "an earlier one") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{where}: expected a JSON object, got {type(state).__name__}")
    step = state.get("step")
    manifest_step = json.loads((directory / MANIFEST).read_text(encoding="utf-8")).get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step != step_of(directory) or step != manifest_step:
        raise CheckpointError(f"{where}: step {step!r} disagrees with its directory {directory.name} (and "
                              f"{MANIFEST} says {manifest_step!r}); the checkpoint was moved or edited, delete it "
                              "to resume from an earlier one")
    for key in ("data_state", "extra"):
        if not isinstance(state.get(key, {}), dict):
            raise CheckpointError(f"{where}: field {key!r} must be an object, got {state.get(key)!r}")
    if "data_state" not in state:
        raise CheckpointError(f"{where}: field 'data_state' is missing")
    return state


def verify_checksums(directory: Path) -> None:
    """Every file against the checksum its manifest records (checkpoints from before checksums
    were recorded have sizes only): a weight file with flipped bytes of the same size was
    resumed from silently."""
    recorded = json.loads((directory / MANIFEST).read_text(encoding="utf-8")).get("checksums")
    if recorded is None:
        return
    if not isinstance(recorded, dict):
        raise CheckpointError(f"{directory / MANIFEST}: field 'checksums' must be an object")
    for name, checksum in sorted(recorded.items()):
        if _checksum(directory / name) != checksum:
            raise CheckpointError(f"{directory / name} changed after the checkpoint was saved (its checksum differs "
                                  f"from the one {MANIFEST} records); delete checkpoint {directory.name} to resume "
                                  "from an earlier one")
