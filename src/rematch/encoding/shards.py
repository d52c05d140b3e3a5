"""Encoding a long list of items in shards: resumable, and split across ``torchrun`` ranks.

``rematch index build`` and ``rematch encode`` both cut their items into shards of
``shard_size`` and write each finished shard atomically (``shard-NNNNNN.npz``: vectors,
ids, the model's fingerprint and a hash of the shard's content). A rerun reuses every shard
whose model and content still match, so an interrupted job resumes where it stopped.

Under ``torchrun`` (a ``torch.distributed`` process group, see
:mod:`rematch.encoding.distributed`) rank r encodes shards r, r + W, r + 2W... into the
same shards directory, every rank waits for the others, and only rank 0 assembles the
result (the same vectors as one process: each item is encoded once, by one rank, with the
same model). The shard directory must therefore be on a file system all ranks share.
"""

from __future__ import annotations

import hashlib
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from rematch.atomic import write_atomically, write_npz_atomically
from rematch.data.images import image_stamp
from rematch.data.items import Item
from rematch.distributed import all_gather, barrier, is_main_process, rank_and_world


@dataclass
class ShardedEncoding:
    """The shard files of a finished encoding (all ranks' shards) and what this run did."""

    files: list[Path]
    counts: list[int]
    encoded: int
    reused: int
    seconds: float

    def chunks(self) -> Iterator[np.ndarray]:
        """Each shard's vectors, in order; a shard of the wrong size or width is an error naming it."""
        dimension = None
        for file, count in zip(self.files, self.counts):
            with np.load(file, allow_pickle=False) as data:
                vectors = data["vectors"]
            dimension = vectors.shape[1] if dimension is None else dimension
            if vectors.ndim != 2 or vectors.shape != (count, dimension):
                raise RuntimeError(f"{file}: vectors of shape {vectors.shape}, expected ({count}, {dimension}); "
                                   "were the ranks running different models?")
            yield vectors

    @property
    def dimension(self) -> int:
        with np.load(self.files[0], allow_pickle=False) as data:
            return int(data["vectors"].shape[1])


def shard_hash(ids: Sequence[str], items: Sequence[Item]) -> str:
    """Identity of a shard's content: ids, item content and image file stamps."""
    digest = hashlib.sha256()
    for item_id, item in zip(ids, items):
        digest.update(f"{item_id}\x00{item.cache_key()}\x00{image_stamp(item)}\x01".encode("utf-8"))
    return digest.hexdigest()


def load_finished_shard(file: Path, fingerprint: str, expected_hash: str, count: int) -> np.ndarray | None:
    """The shard's vectors if the file is a finished shard of this content and model, else None."""
    if not file.is_file():
        return None
    try:
        with np.load(file, allow_pickle=False) as data:
            if str(data["fingerprint"]) != fingerprint or str(data["content_hash"]) != expected_hash:
                return None
            vectors = data["vectors"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None  # unreadable (e.g. truncated by a full disk or a kill): encode it again
    if vectors.shape[0] != count or not np.isfinite(vectors).all():
        return None
    return vectors


def shard_where(where: str, start: int) -> str:
    """How errors name an item of a shard starting at ``start`` ("rows.jsonl row 4096 + 3")."""
    return where if start == 0 else f"{where} {start} +"


def encode_in_shards(model, items: Sequence[Item], ids: Sequence[str], shards_dir: Path, *, role: str = "document",
                     shard_size: int = 4096, batch_size: int = 16, show_progress: bool = False,
                     where: str = "corpus item", salt: str = "",
                     on_shard_done: Callable[[int, int], None] | None = None,
                     log: Callable[[str], None] | None = print) -> ShardedEncoding:
    """Encode ``items`` into shard files under ``shards_dir``, this rank's share only; reuse finished ones.

    ``salt`` goes into every shard's content hash (``encode`` passes the role, so vectors of
    one role are never reused for the other). Returns, on every rank once all ranks are
    done, every shard file with this run's totals over all ranks.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    rank, world = rank_and_world()
    say = log or (lambda _: None)
    prefix = f"[rank {rank}] " if world > 1 else ""
    fingerprint = model.fingerprint()
    shards_dir.mkdir(parents=True, exist_ok=True)
    bounds = [(start, min(len(items), start + shard_size)) for start in range(0, len(items), shard_size)]
    files = [shards_dir / f"shard-{number:06d}.npz" for number in range(len(bounds))]
    reused = encoded = 0
    seconds = 0.0
    for number, ((start, stop), file) in enumerate(zip(bounds, files)):
        if number % world != rank:
            continue
        expected = _salted(shard_hash(ids[start:stop], items[start:stop]), salt)
        if load_finished_shard(file, fingerprint, expected, stop - start) is not None:
            reused += 1
            continue
        began = time.perf_counter()
        vectors = model.encode(items[start:stop], role=role, batch_size=batch_size, show_progress=show_progress,
                               where=shard_where(where, start))
        seconds += time.perf_counter() - began
        encoded += stop - start
        write_npz_atomically(file, vectors=vectors.astype(np.float32), ids=np.array(ids[start:stop]),
                             fingerprint=np.array(fingerprint), content_hash=np.array(expected))
        say(f"{prefix}shard {number + 1}/{len(bounds)}: {stop - start} items encoded")
        if on_shard_done is not None:
            on_shard_done(number, len(bounds))
    barrier()  # every rank's shards are on disk past this point
    totals = all_gather((encoded, reused, seconds))
    return ShardedEncoding(files=files, counts=[stop - start for start, stop in bounds],
                           encoded=sum(t[0] for t in totals), reused=sum(t[1] for t in totals),
                           seconds=max(t[2] for t in totals))


def encode_to_npy(model, items: Sequence[Item], out: str | Path, *, role: str = "query", batch_size: int = 16,
                  shard_size: int = 4096, show_progress: bool = False, where: str = "item",
                  log: Callable[[str], None] | None = print) -> tuple[int, int] | None:
    """Embed ``items`` into the ``.npy`` file ``out``, resumably and across torchrun ranks.

    Finished shards wait in a hidden ``.NAME.shards`` directory beside ``out`` until every
    item is encoded; then rank 0 writes the array atomically and removes them. Returns the
    array's shape on rank 0, None on the other ranks.
    """
    out = Path(out)
    shards_dir = out.parent / f".{out.name}.shards"
    ids = [str(index) for index in range(len(items))]
    try:
        result = encode_in_shards(model, items, ids, shards_dir, role=role, shard_size=shard_size,
                                  batch_size=batch_size, show_progress=show_progress, where=where, salt=role, log=log)
    except BaseException:
        if shards_dir.is_dir() and not any(shards_dir.iterdir()):
            shards_dir.rmdir()  # nothing to resume from: leave no empty hidden directory behind
        raise
    shape = None
    if is_main_process():
        if result.reused and log:
            log(f"reused {result.reused} finished shard(s) from {shards_dir}")
        vectors = np.concatenate(list(result.chunks())) if items else np.zeros((0, 0), dtype=np.float32)
        if vectors.shape[0] != len(items) or not np.isfinite(vectors).all():
            raise FloatingPointError(f"{shards_dir}: the shards hold {vectors.shape[0]} vectors (or non-finite "
                                     f"values) for {len(items)} items; remove the directory and encode again")
        write_atomically(out, lambda handle: np.save(handle, vectors))  # a crash never leaves half an array
        shutil.rmtree(shards_dir, ignore_errors=True)
        shape = vectors.shape
    barrier()  # the other ranks leave once the array is written
    return shape


def _salted(content_hash: str, salt: str) -> str:
    """The content hash itself without a salt (so index shards of earlier versions stay reusable)."""
    return content_hash if not salt else hashlib.sha256(f"{salt}\x00{content_hash}".encode()).hexdigest()
