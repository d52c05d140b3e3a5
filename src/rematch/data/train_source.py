"""The training stream: endless, shuffled, mixed across subsets, exactly resumable.

How the order is made (all of it a pure function of the seed and a few counters, which is
what lets a run resume exactly without replaying the stream):

* **Which subset** gives step ``t``'s example: draws with the mixing probabilities,
  generated in chunks of ``CHOICE_CHUNK`` steps from ``rng(seed, chunk)``, so step ``t``'s
  draw is recomputable from ``t`` alone. With ``subset_run = n`` one draw covers ``n``
  consecutive steps: set it to the global batch size and every batch comes from one
  subset, so its in-batch negatives are same-task negatives (a batch mixing tasks lets
  the model lower the loss by telling tasks apart instead of matching content).
* **Which row** of that subset: each subset walks its own epochs. An epoch's order
  shuffles the subset's *blocks* (parquet row groups, or runs of 1,024 lines) with
  ``rng(seed, subset, epoch)``, groups them into windows of ``window_blocks`` blocks, and
  shuffles the rows within each window with ``rng(seed, subset, epoch, window)``. A parquet
  row group is therefore decoded about once per epoch (the store caches the window's
  groups), while rows far apart in the file still mix across windows and epochs. When a
  subset's epoch ends the next begins with a fresh order.

The state is just ``step`` plus ``(epoch, position)`` per subset (and the bad-row counts),
a few hundred bytes of JSON. A bad row (with ``skip_bad``) consumes its step and yields
nothing, so positions never depend on row contents -- the property that also lets ranks
of a distributed run take every ``world_size``-th step without reading the others' rows.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from rematch.data.records import TrainExample
from rematch.data.stores import RowReadError, RowStore
from rematch.data.validation import BadRowReport, DataError

STATE_FORMAT = "rematch.TrainSource/1"
CHOICE_CHUNK = 4096


@dataclass
class TrainSubset:
    """One subset of a training stream: its rows (already capped) and the parser for them."""

    name: str
    store: RowStore
    parser: Any  # rematch.data.mmeb.RowParser

    def __len__(self) -> int:
        return len(self.store)


class EpochOrder:
    """The shuffled order of one subset's rows in one epoch, computed one window at a time."""

    def __init__(self, block_starts: np.ndarray, seed: int, subset_key: int, epoch: int, window_blocks: int):
        self.epoch = epoch
        self._seed = (seed, subset_key, epoch)
        sizes = np.diff(block_starts)
        order = np.random.default_rng([seed, subset_key, epoch, 0]).permutation(len(sizes))
        self._blocks = [(int(block_starts[b]), int(block_starts[b + 1])) for b in order]
        self._windows = [self._blocks[i:i + window_blocks] for i in range(0, len(self._blocks), window_blocks)]
        window_sizes = [sum(stop - start for start, stop in window) for window in self._windows]
        self._window_starts = np.concatenate([[0], np.cumsum(window_sizes, dtype=np.int64)]).astype(np.int64)
        self._cached: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return int(self._window_starts[-1])

    def row_at(self, position: int) -> int:
        window = int(np.searchsorted(self._window_starts, position, side="right")) - 1
        if self._cached is None or self._cached[0] != window:
            rows = np.concatenate([np.arange(start, stop, dtype=np.int64) for start, stop in self._windows[window]])
            seed, subset_key, epoch = self._seed
            rows = np.random.default_rng([seed, subset_key, epoch, 1, window]).permutation(rows)
            self._cached = (window, rows)
        return int(self._cached[1][position - int(self._window_starts[window])])


class TrainSource:
    """An endless iterator of :class:`TrainExample` over several subsets (see the module docstring).

    Iterate it directly (``next(source)``); :meth:`state_dict` taken between two ``next``
    calls and given to :meth:`load_state_dict` of a source opened the same way makes that
    source continue with exactly the example that would have come next.
    """

    def __init__(self, subsets: Sequence[TrainSubset], weights: Mapping[str, float] | None = None, seed: int = 0,
                 skip_bad: bool = False, report: BadRowReport | None = None, window_blocks: int = 4,
                 rank: int = 0, world_size: int = 1, subset_run: int = 1):
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        if window_blocks < 1:
            raise ValueError(f"window_blocks must be >= 1, got {window_blocks}")
        if subset_run < 1:
            raise ValueError(f"subset_run must be >= 1, got {subset_run}")
        self.subset_run = subset_run
        self.subsets = list(subsets)
        self.seed = int(seed)
        self.skip_bad = skip_bad
        self.report = report if report is not None else BadRowReport()
        self.window_blocks = window_blocks
        self.rank, self.world_size = rank, world_size
        for subset in self.subsets:  # keep a window's row groups decoded while it is being read
            for store in getattr(subset.store, "stores", [subset.store]):
                if hasattr(store, "cache_row_groups"):
                    store.cache_row_groups = max(store.cache_row_groups, window_blocks + 1)
        self.probabilities = self._probabilities(weights)
        active = [s for s, p in zip(self.subsets, self.probabilities) if p > 0]
        empty = [s.name for s in active if len(s) == 0]
        if empty:
            raise DataError(f"training subset(s) {empty} have no rows (after caps)")
        self._keys = [zlib.crc32(s.name.encode("utf-8")) for s in self.subsets]
        self._step = 0
        self._epochs = [0] * len(self.subsets)
        self._positions = [0] * len(self.subsets)
        self._orders: dict[int, EpochOrder] = {}
        self._choice_chunk: tuple[int, np.ndarray] | None = None
        self._bad_run = [0] * len(self.subsets)

    # ------------------------------------------------------------------ sizes and mixing

    def __len__(self) -> int:
        """Rows available (after caps) in the subsets that are drawn from."""
        return sum(len(s) for s, p in zip(self.subsets, self.probabilities) if p > 0)

    @property
    def subset_names(self) -> list[str]:
        return [s.name for s in self.subsets]

    def rows_per_subset(self) -> dict[str, int]:
        return {s.name: len(s) for s in self.subsets}

    def _probabilities(self, weights: Mapping[str, float] | None) -> np.ndarray:
        names = self.subset_names
        if weights is None:
            raw = np.array([len(s) for s in self.subsets], dtype=np.float64)
        else:
            unknown = sorted(set(weights) - set(names))
            missing = [name for name in names if name not in weights]
            if unknown or missing:
                raise DataError(f"weights must name every subset exactly: unknown {unknown}, missing {missing}")
            raw = np.array([float(weights[name]) for name in names], dtype=np.float64)
            if (raw < 0).any() or not np.isfinite(raw).all():
                raise DataError(f"weights must be finite and >= 0, got {dict(weights)}")
        if raw.sum() <= 0:
            raise DataError("no training rows to draw from (all subsets empty or weighted 0)")
        return raw / raw.sum()

    def _choose(self, step: int) -> int:
        if len(self.subsets) == 1:
            return 0
        chunk = step // CHOICE_CHUNK
        if self._choice_chunk is None or self._choice_chunk[0] != chunk:
            rng = np.random.default_rng([self.seed, 0x6D6978, chunk])
            self._choice_chunk = (chunk, rng.choice(len(self.subsets), size=CHOICE_CHUNK, p=self.probabilities))
        return int(self._choice_chunk[1][step % CHOICE_CHUNK])

    # ------------------------------------------------------------------ iteration

    def _order(self, index: int) -> EpochOrder:
        order = self._orders.get(index)
        epoch = self._epochs[index]
        if order is None or order.epoch != epoch:
            order = EpochOrder(self.subsets[index].store.block_starts(), self.seed, self._keys[index], epoch,
                               self.window_blocks)
            self._orders[index] = order
        return order

    def _advance(self, index: int) -> int:
        row = self._order(index).row_at(self._positions[index])
        self._positions[index] += 1
        if self._positions[index] >= len(self.subsets[index]):
            self._epochs[index] += 1
            self._positions[index] = 0
        return row

    def __iter__(self) -> Iterator[TrainExample]:
        return self

    def __next__(self) -> TrainExample:
        while True:
            step = self._step
            self._step += 1
            index = self._choose(step // self.subset_run)
            row = self._advance(index)
            if step % self.world_size != self.rank:
                continue
            example = self._read(index, row)
            if example is not None:
                return example

    def _read(self, index: int, row: int) -> TrainExample | None:
        subset = self.subsets[index]
        ref = subset.store.ref(row)
        try:
            raw = subset.store.read(row)
        except RowReadError as error:
            raw = error
        parsed = subset.parser.train(raw, ref)
        if parsed.problems:
            self.report.handle(parsed.problems[0], self.skip_bad)
            self._bad_run[index] += 1
            if self._bad_run[index] >= max(len(subset) // self.world_size, 1) + 1:
                raise DataError(f"every row of subset {subset.name} seems bad ({self._bad_run[index]} in a row); "
                                f"{self.report.summary()}")
            return None
        self._bad_run[index] = 0
        for repair in parsed.repairs:
            self.report.record_repair(repair, ref)
        return parsed.record

    def take(self, count: int) -> list[TrainExample]:
        """The next ``count`` examples."""
        return [next(self) for _ in range(count)]

    @property
    def epochs_completed(self) -> float:
        """Passes over the data so far, in rows drawn / rows available (for logging)."""
        return self._step / max(1, len(self))

    # ------------------------------------------------------------------ exact resume

    def state_dict(self) -> dict[str, Any]:
        """A small JSON-serialisable snapshot: where every counter stands, and what it applies to."""
        return {
            "format": STATE_FORMAT,
            "seed": self.seed,
            "window_blocks": self.window_blocks,
            "subset_run": self.subset_run,
            "rank": self.rank,
            "world_size": self.world_size,
            "step": self._step,
            "subsets": [{"name": s.name, "rows": len(s), "probability": float(p), "epoch": e, "position": q}
                        for s, p, e, q in zip(self.subsets, self.probabilities, self._epochs, self._positions)],
            "report": self.report.to_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue exactly where ``state`` was taken. The data, caps, weights, seed and
        sharding must be the same; any difference is an error (a resume that silently
        changed the order would not be a resume)."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a TrainSource state (format {state.get('format')!r}, expected {STATE_FORMAT!r})")
        expected = {"seed": self.seed, "window_blocks": self.window_blocks, "rank": self.rank,
                    "world_size": self.world_size, "subset_run": self.subset_run}
        differences = [f"{key}: saved {state.get(key)!r}, now {value!r}" for key, value in expected.items()
                       if state.get(key) != value]
        saved = [(s["name"], int(s["rows"])) for s in state["subsets"]]
        now = [(s.name, len(s)) for s in self.subsets]
        if saved != now:
            differences.append(f"subsets/rows: saved {saved}, now {now}")
        saved_p = [float(s["probability"]) for s in state["subsets"]]
        if len(saved_p) == len(self.probabilities) and not all(
                math.isclose(a, float(b), rel_tol=1e-9, abs_tol=1e-12) for a, b in zip(saved_p, self.probabilities)):
            differences.append(f"mixing probabilities: saved {saved_p}, now {self.probabilities.tolist()}")
        if differences:
            raise ValueError("cannot resume this training stream exactly: " + "; ".join(differences))
        self._step = int(state["step"])
        self._epochs = [int(s["epoch"]) for s in state["subsets"]]
        self._positions = [int(s["position"]) for s in state["subsets"]]
        self._orders.clear()
        self._choice_chunk = None
        self._bad_run = [0] * len(self.subsets)
        if "report" in state:
            self.report.load_dict(state["report"])

    def close(self) -> None:
        for subset in self.subsets:
            subset.store.close()
