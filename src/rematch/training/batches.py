"""Turning the training source into per-step batches, with a resumable position.

Every process draws the same *global* batch (batch_size x processes examples) from the
same seeded stream and collates only its own slice, so all processes agree on the data
position and a checkpoint stores it once. Collation (image decoding, tokenisation) runs
in a small thread pool a few steps ahead; the position saved with a checkpoint is the
one after the last batch actually trained on, never after the prefetched ones.
"""

from __future__ import annotations

import itertools
import json
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from rematch.config import Config


@dataclass
class StepBatch:
    batch: Any  # the collated TrainBatch of this process
    data_state: dict[str, Any]  # the source position after this step's examples


class BatchStream:
    """Yields :class:`StepBatch` objects forever; prefetches ``prefetch`` steps in threads."""

    def __init__(self, source, collate: Callable, batch_size: int, rank: int = 0, world_size: int = 1,
                 prefetch: int = 2, workers: int = 1):
        self.source = source
        self.iterator = iter(source)
        self.collate = collate
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.prefetch = max(0, prefetch)
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers)) if self.prefetch else None
        self.pending: deque[tuple[Future, dict[str, Any]]] = deque()

    def _draw(self) -> tuple[list, dict[str, Any]]:
        examples = list(itertools.islice(self.iterator, self.batch_size * self.world_size))
        if len(examples) < self.batch_size * self.world_size:
            raise RuntimeError("the training source ran dry (it should cycle through epochs)")
        mine = examples[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        return mine, self.source.state_dict()

    def __iter__(self):
        return self

    def __next__(self) -> StepBatch:
        if self.pool is None:
            examples, state = self._draw()
            return StepBatch(self.collate(examples), state)
        while len(self.pending) <= self.prefetch:
            examples, state = self._draw()
            self.pending.append((self.pool.submit(self.collate, examples), state))
        future, state = self.pending.popleft()
        return StepBatch(future.result(), state)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)


def resolve_train_source(config: Config, run_dir: Path, log=print) -> tuple[str, str | None]:
    """The data source and image root to read; ``builtin`` generates the shapes world once per run.

    The generated world records the parameters it was made with (``.complete`` holds them as
    JSON) and is made again, atomically, when they differ from the config's: a world of 40 rows
    must never be trained on by a run whose config.yaml says 2,000.
    """
    data = config.data
    if data.source != "builtin":
        return data.source, data.image_root
    from rematch.atomic import write_directory_atomically
    from rematch.world.tasks import write_shapes_dataset

    root = run_dir / "data" / "shapes"
    marker = root / ".complete"
    wanted = {"train_rows": data.builtin_train_rows, "seed": data.builtin_seed, "generator_version": 1}
    if _read_marker(marker) != wanted:
        reason = "" if not root.exists() else " (the one there was made with other settings or is incomplete)"
        log(f"generating the built-in shapes world ({data.builtin_train_rows} training rows, seed "
            f"{data.builtin_seed}) in {root}{reason}")

        def write(directory: Path) -> None:
            write_shapes_dataset(directory, train_rows=data.builtin_train_rows, eval_queries=0, seed=data.builtin_seed)
            (directory / marker.name).write_text(json.dumps(wanted) + "\n", encoding="utf-8")

        write_directory_atomically(root, write, what="the built-in shapes world",
                                   is_ours=lambda path: (path / "manifest.json").is_file())
    return str(root), data.image_root


def _read_marker(marker: Path) -> dict | None:
    try:
        return json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def open_source(config: Config, run_dir: Path, log=print, world_size: int = 1):
    from rematch.data.mmeb import open_train_source

    source, image_root = resolve_train_source(config, run_dir, log)
    data = config.data
    return open_train_source(source, subsets=data.subsets or None, split=data.split, image_root=image_root,
                             caps=data.caps or None, weights=data.weights or None, seed=config.train.seed,
                             skip_bad=data.skip_bad, strip_orphan_placeholders=data.strip_orphan_placeholders,
                             subset_run=config.train.batch_size * world_size if data.one_subset_per_batch else 1)
