"""Encoding across processes: each rank encodes a strided shard, the shards are gathered.

The shard of rank r is items r, r + W, r + 2W... (strided rather than contiguous, so every
rank gets a similar mix of long and short items). Only the main process writes files.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from rematch.data.items import Item
from rematch.distributed import all_gather, rank_and_world
from rematch.encoding.cache import CachedEncoder, EncodeStats


def encode_across_ranks(encoder: CachedEncoder, items: Sequence[Item], role: str) -> np.ndarray:
    """All of ``items`` embedded, each rank encoding only its strided shard; every rank gets the full array."""
    rank, world = rank_and_world()
    if world == 1:
        return encoder.encode(items, role)
    local = encoder.encode(items[rank::world], role)
    shards = all_gather(local)
    dims = {shard.shape[1] for shard in shards if shard.size}
    if len(dims) > 1:
        raise RuntimeError(f"ranks returned embeddings of different sizes {sorted(dims)}: are all ranks "
                           "running the same model?")
    output = np.zeros((len(items), dims.pop() if dims else 0), dtype=np.float32)
    for shard_rank, shard in enumerate(shards):
        if shard.size:
            output[shard_rank::world] = shard
    return output


def gather_stats(stats: EncodeStats) -> EncodeStats:
    """Encoding totals over all ranks; seconds is the slowest rank's (the ranks run in parallel)."""
    everyone = all_gather(stats)
    return EncodeStats(encoded=sum(s.encoded for s in everyone), cached=sum(s.cached for s in everyone),
                       seconds=max(s.seconds for s in everyone))
