"""A run directory belongs to one run: reuse it only to resume that run, or start over explicitly.

Without these rules a second ``rematch train --out runs/x`` truncated the first run's loss
log, overwrote its config.yaml and model, and had its own new checkpoints pruned because
the old ones carried higher step numbers; a later ``--resume`` then continued the OLD run
under the NEW config while config.yaml recorded the new values. Now:

* a run directory is new, empty, or marked as a run by its output record
  (:mod:`rematch.outputs`; a run from before records: a readable ``run.json``); any other
  folder is refused, ``--resume`` and ``--overwrite`` included, so they never touch a user's
  files;
* a directory that holds a previous run is refused unless ``train.resume`` (continue it) or
  ``train.overwrite`` (delete that run's recorded outputs, then start afresh) is given;
* ``run.json`` names the run (a random id) and every checkpoint records that id, the
  config's hash and the config itself, so a resume checks it continues the same run with
  the same settings; a changed setting is an error naming it, unless
  ``train.resume_with_changes`` accepts the changes explicitly (they are logged);
* settings that do not change what is computed (logging, checkpoint cadence, workers,
  the step count, which only extends or shortens the run) may differ on resume, but a
  checkpoint past ``train.steps`` is an error;
* ``run.json`` and every checkpoint also record the run format (:data:`RUN_FORMAT`): a run
  written by an older rematch, whose settings hash and checkpoints this one does not
  promise to read the same way, is refused on resume with one line saying so, instead of
  being continued under settings that only look the same.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping

from rematch.atomic import write_json_atomically
from rematch.config import Config, ConfigError
from rematch.hub.card import RUN_RECORD_NAME
from rematch.outputs import OutputDirectory, OutputRefusedError

RUN_FILE = RUN_RECORD_NAME

#: The layout of a run directory and its checkpoints. 2: the one training loop of ``rematch
#: train`` and ``rematch pretrain`` (rematch.training.runner) and their shared ``train``
#: section; runs without a format (1) were written before it and are not resumed.
RUN_FORMAT = 2

#: What a run writes into its directory (``--overwrite`` deletes those of these that the directory's output
#: record says rematch wrote, and nothing else).
RUN_OUTPUTS = ("run.json", "config.yaml", "losses.jsonl", "losses.csv", "loss_curves.png", "train_summary.json",
               "checkpoints", "model", "tensorboard", "data", "heldout.jsonl", "heldout.csv")

#: Settings that may differ when a run is resumed: they change how it is logged, saved or
#: fed, or how long it runs, not what a step computes.
RESUMABLE_CHANGES = frozenset({"train.resume", "train.overwrite", "train.resume_with_changes", "train.out",
                               "train.steps", "train.log_every", "train.save_every", "train.keep_last", "train.plot",
                               "data.num_workers"})


class RunDirectoryError(ConfigError):
    """A run directory cannot be used as asked (a previous run there, or a checkpoint of another run)."""


def flat_config(config: Config) -> dict[str, Any]:
    """``{"section.key": value}`` of a config, for hashing and for naming what changed."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping) and prefix.count(".") < 1:
            for key, sub in value.items():
                walk(f"{prefix}.{key}" if prefix else key, sub)
        else:
            flat[prefix] = value

    walk("", dataclasses.asdict(config))
    return flat


def config_hash(config: Config) -> str:
    """Identity of the settings that decide what a step computes (everything but RESUMABLE_CHANGES)."""
    relevant = {key: value for key, value in flat_config(config).items() if key not in RESUMABLE_CHANGES}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _earlier_run(out: Path) -> set[str]:
    """A run directory written before output markers: a readable ``run.json`` with a run id (a
    folder that merely holds a ``config.yaml`` or ``losses.jsonl`` is the user's, not a run)."""
    if read_run_id(out) is None:
        return set()
    return {name for name in RUN_OUTPUTS if (out / name).exists() or (out / name).is_symlink()}


def _inspect(out: Path, command: str, train) -> OutputDirectory:
    """The run directory's output record; a folder that is not a run of ``command`` is refused,
    ``--resume`` and ``--overwrite`` or not (they act on a run, never on a user's files)."""
    try:
        return OutputDirectory.inspect(out, command, adopt=_earlier_run)
    except OutputRefusedError as error:
        flags = " and ".join(flag for flag, given in (("--resume", train.resume), ("--overwrite", train.overwrite))
                             if given)
        note = f"; {flags} {'act' if ' and ' in flags else 'acts'} only on a run directory" if flags else ""
        raise RunDirectoryError(f"{error}{note}") from None


def holds_a_run(out: Path, command: str = "train") -> bool:
    """Whether ``out`` holds (part of) a run of ``command`` that rematch recorded writing."""
    if not out.is_dir():
        return False
    try:
        record = OutputDirectory.inspect(out, command, adopt=_earlier_run)
    except OutputRefusedError:
        return False
    return any((out / name).exists() for name in record.files if name != "data")


def check_run_directory(config: Config, command: str = "train") -> None:
    """Refuse a directory that is not new, empty or a run of ``command``, and one holding a
    previous run unless resuming or overwriting (read-only: every process calls it before any
    writes, so all of them stop together)."""
    out, train = Path(config.train.out), config.train
    record = _inspect(out, command, train)
    previous = any((out / name).exists() for name in record.files if name != "data")
    if previous and not (train.resume or train.overwrite):
        raise RunDirectoryError(f"{out} holds a previous run; pass --resume (train.resume=true) to continue it, "
                                "or --overwrite (train.overwrite=true) to delete its outputs and start over, or "
                                "choose another --out")
    if train.resume and previous:
        check_run_format(read_run_format(out), str(out))
    record.check(*RUN_OUTPUTS)  # a file of the user's under a run's output name is never replaced


def prepare_run_directory(config: Config, log: Callable[[str], None] = print, command: str = "train") -> str:
    """Apply the reuse rules to ``config.train.out`` (main process only, after every process
    passed :func:`check_run_directory`); returns the run id. ``--overwrite`` deletes only the
    outputs the directory's record says this command wrote."""
    out = Path(config.train.out)
    train = config.train
    check_run_directory(config, command)
    previous = holds_a_run(out, command)
    record = OutputDirectory.claim(out, command, adopt=_earlier_run)
    if previous and not train.resume:
        log(f"--overwrite: deleting the previous run's outputs in {out}")
        for name in RUN_OUTPUTS:
            if name in record.files:
                record.remove(name)
    record.will_write(*RUN_OUTPUTS)
    existing = read_run_id(out)
    if existing is not None and train.resume:
        return existing
    run_id = uuid.uuid4().hex[:12]
    write_json_atomically(out / RUN_FILE, {"run_id": run_id, "format": RUN_FORMAT})
    return run_id


def seal_run_directory(out: Path, command: str = "train") -> None:
    """Record what the finished run wrote (sizes, small files' hashes), so a later change by the
    user is seen as theirs (main process only, at the end of the run)."""
    OutputDirectory.inspect(out, command, adopt=_earlier_run).seal()


def read_run_id(out: Path) -> str | None:
    try:
        return str(json.loads((out / RUN_FILE).read_text(encoding="utf-8"))["run_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_run_format(out: Path) -> int | None:
    """The run format ``run.json`` records (None: no readable ``run.json``, or one from before formats)."""
    try:
        found = json.loads((out / RUN_FILE).read_text(encoding="utf-8")).get("format")
    except (OSError, ValueError, AttributeError):
        return None
    return found if isinstance(found, int) else None


def check_run_format(found: int | None, what: str) -> None:
    """Refuse to resume a run (``what``: its directory or a checkpoint) of another run format."""
    if found == RUN_FORMAT:
        return
    if found is None or found < RUN_FORMAT:
        raise RunDirectoryError(f"{what} was written by an older rematch (run format {found or 1}, this one writes "
                                f"{RUN_FORMAT}) and cannot be resumed; start it over with --overwrite, or choose "
                                "another --out")
    raise RunDirectoryError(f"{what} was written by a newer rematch (run format {found}, this one reads "
                            f"{RUN_FORMAT}); resume it with that version")


def checkpoint_identity(run_id: str, config: Config) -> dict[str, Any]:
    """What every checkpoint records about its run (checked by :func:`check_resume`)."""
    return {"run_format": RUN_FORMAT, "run_id": run_id, "config_hash": config_hash(config),
            "config": flat_config(config)}


def check_resume(extra: Mapping[str, Any], run_id: str | None, config: Config, step: int, checkpoint: Path,
                 log: Callable[[str], None] = print) -> None:
    """Refuse to resume a checkpoint of an older run format, another run's checkpoint, a
    checkpoint past ``train.steps``, or one written under other settings (unless
    ``train.resume_with_changes``)."""
    check_run_format(extra.get("run_format"), str(checkpoint))
    if step > config.train.steps:
        raise RunDirectoryError(f"{checkpoint} is at step {step}, past train.steps={config.train.steps}; raise "
                                "--steps to continue, or start a new run")
    if run_id is not None and extra["run_id"] != run_id:
        raise RunDirectoryError(f"{checkpoint} belongs to run {extra['run_id']}, not to run {run_id} of "
                                f"{config.train.out}; resume from that run's own directory")
    if extra.get("config_hash") == config_hash(config):
        return
    now = flat_config(config)
    saved = extra.get("config", {})
    changed = sorted(key for key in set(now) | set(saved)
                     if key not in RESUMABLE_CHANGES and now.get(key) != saved.get(key))
    described = ", ".join(f"{key}: {saved.get(key)!r} -> {now.get(key)!r}" for key in changed[:6])
    if not config.train.resume_with_changes:
        raise RunDirectoryError(f"resuming {checkpoint} with other settings than it was trained with ({described}); "
                                "undo the changes, or pass --train.resume_with_changes true to accept them")
    log(f"resuming with changed settings, as train.resume_with_changes asks: {described}")
