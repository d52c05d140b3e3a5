"""Adding items to, and deleting items from, an index directory without rebuilding it from the corpus.

Why: re-encoding a whole corpus to add a few documents costs as much as the first build.
An update encodes only the new items and rebuilds the FAISS structure from the vectors
the index already stores (flat, IVF and HNSW keep them exactly), so the result is the index
a fresh build of the same items in the same order would give.

Both are safe the way ``index build`` is:

* the index is verified against its content hash before it is changed, and the model must
  be the one it was built with (its fingerprint);
* the new items are encoded in shards under ``INDEX/shards/`` (the manifest stays, so the
  index keeps serving the old items meanwhile); an interrupted ``add`` rerun with the same
  items reuses the finished shards;
* the updated directory is written beside the old one and swapped in with one rename.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from rematch.data.items import ItemLike, as_items
from rematch.distributed import barrier, is_main_process
from rematch.encoding.shards import encode_in_shards
from rematch.retrieval.corpus import CorpusError, check_regular_file
from rematch.retrieval.index import SHARDS_DIR, Index, make_records

#: Salted into the shard hashes of an addition, so they are never mistaken for a build's shards.
ADD_SALT = "index-add"


def add_to_index(model, path: str | os.PathLike, items: Sequence[ItemLike], ids: Sequence[str], *,
                 metadata: Sequence[Mapping] | None = None, shard_size: int = 4096, batch_size: int = 16,
                 show_progress: bool = False, verify: bool = True,
                 on_shard_done: Callable[[int, int], None] | None = None,
                 log: Callable[[str], None] | None = print) -> Index | None:
    """Encode ``items`` (with new ``ids``) into the index at ``path``; rerunning after an interruption resumes.

    Under ``torchrun`` each rank encodes its share of the shards; rank 0 writes the index and
    returns it, the other ranks return None.
    """
    say = log or (lambda _: None)
    path = Path(path)
    index = Index.load(path, model=model, verify=verify)  # damage and another model are refused here
    items = as_items(items, "new item")
    if not items:
        raise ValueError("no items to add")
    ids, records = make_records(items, ids, metadata)
    clash = sorted(set(index.ids) & set(ids))
    if clash:
        raise ValueError(f"{path} already holds id(s) {clash[:5]}; delete them first (rematch index delete) to "
                         "replace them")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    result = encode_in_shards(model, items, ids, path / SHARDS_DIR, role="document", shard_size=shard_size,
                              batch_size=batch_size, show_progress=show_progress, salt=ADD_SALT,
                              on_shard_done=on_shard_done, log=log)
    if not is_main_process():
        barrier()
        return None
    if result.reused:
        say(f"reused {result.reused} of {len(result.files)} finished shard(s) from {path / SHARDS_DIR}")
    vectors = np.concatenate(list(result.chunks()))
    index.add_vectors(vectors, records).save(path)  # the shards go with the old directory
    say(f"added {len(records)} items to {path}: {len(index)} items")
    barrier()
    return index


def delete_from_index(path: str | os.PathLike, ids: Iterable[str], *, verify: bool = True,
                      log: Callable[[str], None] | None = print) -> Index:
    """Remove the items with ``ids`` from the index at ``path`` (every id must be there)."""
    path = Path(path)
    ids = list(ids)
    index = Index.load(path, verify=verify).delete(ids)
    index.save(path)
    if log:
        log(f"deleted {len(set(map(str, ids)))} items from {path}: {len(index)} items")
    return index


def read_ids(path: str | os.PathLike) -> list[str]:
    """Ids, one per line (blank lines skipped), from a text file."""
    lines = check_regular_file(path, "ids file").read_text(encoding="utf-8").splitlines()
    ids = [line.strip() for line in lines if line.strip()]
    if not ids:
        raise CorpusError(f"{path}: no ids (the file is empty or blank)")
    return ids
