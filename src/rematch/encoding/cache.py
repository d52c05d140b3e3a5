"""An on-disk embedding cache, so re-running an evaluation (or adding a metric) costs no encoding.

Design, and why:

* One SQLite file per model, ``<cache_dir>/<model.fingerprint()>.sqlite3``: vectors of a
  different model (or of the same model after more training) can never be served,
  because the fingerprint covers the configuration and the weights.
* Row key = sha256(role, ``Item.cache_key()``, image file stamp, input limits). The same
  item is embedded differently as a query and as a document, so the role is part of the
  key. The input limits (image pixel bounds and text-token limit the adapter builds
  inputs with, :func:`rematch.evaluation.settings.encoding_settings`) are evaluation
  settings that change the vector without changing the model's fingerprint, so they are
  part of the key too: a vector computed at 448 x 448 is never served to a 1M-pixel run.
  An item with a video adds how its frames are taken (the sampling rule, the frame count,
  the frame rate and the per-frame pixel budget, :func:`video_settings`): ``eval mmeb-v2``
  samples 8 frames by the harness's rule where the model samples by its own, and a vector of
  one frame count is never served to another. Items without a video keep the key they had.
  An adapter whose prompt layout changed after vectors were cached names its layout
  (``prompt_format``), which joins the key of all its items.
  For images (and videos, frame folders, frame lists) given as paths the stamp is a hash of
  the files' bytes (:func:`rematch.data.images.content_digest`): an image swapped for
  another under the same name -- even one of the same size and modification time, which
  the earlier size + mtime stamp missed -- invalidates its vector. Each file is read once
  per process while its (path, inode, size, mtime, ctime) stay the same, so a repeated
  lookup costs one ``stat``. (In-memory PIL images are keyed by a hash of their pixels in
  ``Item.cache_key``.) Rows cached under the earlier stamps are simply not found again.
* SQLite gives atomic, crash-safe commits (a crash mid-write loses at most the chunk in
  flight, never corrupts what was committed), indexed lookups by key, and safe
  concurrent writers (each rank of a distributed evaluation writes its own shard).
  Encoding is committed in chunks, so an interrupted evaluation resumes almost where it
  stopped.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from rematch.data.images import image_stamp
from rematch.data.items import Item

_SCHEMA = "CREATE TABLE IF NOT EXISTS embeddings (key TEXT PRIMARY KEY, dim INTEGER NOT NULL, vector BLOB NOT NULL)"
_LOOKUP_CHUNK = 500  # stays under SQLite's limit on bound parameters


class EmbeddingCacheError(ValueError):
    """The embedding cache holds, or was asked to store, something that is not a valid embedding."""


def _is_unit(vector: np.ndarray) -> bool:
    return bool(np.isfinite(vector).all()) and abs(float(np.linalg.norm(vector)) - 1.0) < 1e-3


def default_cache_dir() -> Path:
    """``$REMATCH_CACHE_DIR`` or ``$XDG_CACHE_HOME/rematch/embeddings`` (``~/.cache/rematch/embeddings``)."""
    if os.environ.get("REMATCH_CACHE_DIR"):
        return Path(os.environ["REMATCH_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "rematch" / "embeddings"


def embedding_key(item: Item, role: str, settings: str = "") -> str:
    """The cache row key of ``item`` embedded in ``role`` under input ``settings`` (see the module docstring)."""
    text = f"{role}\x00{item.cache_key()}\x00{image_stamp(item)}"
    if settings:
        text += f"\x00{settings}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def encoding_settings(model) -> str:
    """The part of an embedding's identity that comes from input settings, not the model.

    Part of the cache's row key: evaluation may encode at other image and text limits than
    the model's own (``rematch.evaluation.settings.input_limits`` swaps the adapter's
    config), and a vector computed at one size must never be served at another. Empty for
    an encoder without an adapter (then nothing but the model's fingerprint can change its
    vectors).
    """
    adapter = getattr(model, "adapter", None)
    config = getattr(adapter, "config", None)
    if config is None:
        return ""
    settings = (f"min_pixels={int(config.min_pixels)};max_pixels={int(config.max_pixels)};"
                f"max_text_tokens={int(config.max_text_tokens)}")
    prompt_format = getattr(adapter, "prompt_format", None)
    return settings + (f";format={prompt_format}" if prompt_format else "")


def video_settings(model) -> str:
    """How the adapter takes a video's frames right now (part of the key of items with a video).

    ``eval mmeb-v2`` switches the adapter to the MMEB-V2 harness's rule and frame count for
    the evaluation (``rematch.evaluation.settings.video_sampling``) without changing the
    model's fingerprint, so the rule, the count, the frame rate and the frame size budget
    are part of a video item's key. Empty for an encoder without an adapter.
    """
    config = getattr(getattr(model, "adapter", None), "config", None)
    if config is None:
        return ""
    return (f"video_sampling={config.video_sampling};video_max_frames={int(config.video_max_frames)};"
            f"video_fps={float(config.video_fps)!r};frame_max_pixels={int(config.frame_max_pixels)}")


def item_settings(item: Item, settings: str, video: str) -> str:
    """The settings part of ``item``'s key: the input settings, and the video settings for a video."""
    return f"{settings};{video}" if item.video is not None and video else settings


class EmbeddingCache:
    """Vectors of one model, stored by :func:`embedding_key`."""

    def __init__(self, directory: str | os.PathLike, fingerprint: str):
        self.directory = Path(directory).expanduser()
        self.fingerprint = fingerprint
        self.path = self.directory / f"{fingerprint}.sqlite3"
        self._connection: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        if self._connection is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            try:
                connection = sqlite3.connect(self.path, timeout=300)
                with connection:
                    connection.execute(_SCHEMA)
            except sqlite3.DatabaseError as error:
                raise EmbeddingCacheError(f"embedding cache {self.path} cannot be opened ({error}); "
                                          "delete the file to start a fresh cache") from error
            self._connection = connection
        return self._connection

    def get_many(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """The cached vectors among ``keys`` (missing keys are simply absent)."""
        connection = self._connect()
        found: dict[str, np.ndarray] = {}
        for start in range(0, len(keys), _LOOKUP_CHUNK):
            chunk = list(keys[start:start + _LOOKUP_CHUNK])
            marks = ",".join("?" * len(chunk))
            rows = connection.execute(f"SELECT key, dim, vector FROM embeddings WHERE key IN ({marks})", chunk)
            for key, dim, blob in rows:
                vector = np.frombuffer(blob, dtype=np.float32)
                if vector.size != dim or not _is_unit(vector):
                    raise EmbeddingCacheError(f"embedding cache {self.path}: entry {key} is damaged (not a finite "
                                              "unit vector); delete the file")
                found[key] = vector
        return found

    def put_many(self, keys: Sequence[str], vectors: np.ndarray) -> None:
        """Store vectors in one transaction (all or nothing)."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if len(keys) != len(vectors):
            raise ValueError(f"{len(keys)} keys but {len(vectors)} vectors")
        bad = [key for key, vector in zip(keys, vectors) if not _is_unit(vector)]
        if bad:  # a zero or NaN vector stored once would be served to every later run
            raise EmbeddingCacheError(f"refusing to cache {len(bad)} vector(s) that are not finite unit vectors "
                                      f"(first: {bad[0]})")
        rows = [(key, int(vector.size), vector.tobytes()) for key, vector in zip(keys, vectors)]
        connection = self._connect()
        with connection:
            connection.executemany("INSERT OR REPLACE INTO embeddings (key, dim, vector) VALUES (?, ?, ?)", rows)

    def __len__(self) -> int:
        return int(self._connect().execute("SELECT COUNT(*) FROM embeddings").fetchone()[0])

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


@dataclass
class EncodeStats:
    """What an encoder did: items it ran the model on, items served from the cache, time spent."""

    encoded: int = 0
    cached: int = 0
    seconds: float = 0.0

    def add(self, other: "EncodeStats") -> None:
        self.encoded += other.encoded
        self.cached += other.cached
        self.seconds += other.seconds

    @property
    def items_per_second(self) -> float:
        """Encoding throughput: items the model embedded per second of encoding (cache hits excluded)."""
        return self.encoded / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, float]:
        return {"items_encoded": self.encoded, "items_from_cache": self.cached,
                "encode_seconds": round(self.seconds, 4), "items_per_second": round(self.items_per_second, 3)}


class CachedEncoder:
    """``model.encode`` with an optional on-disk cache in front of it.

    ``model`` only needs ``encode(items, role=, batch_size=, show_progress=)`` and
    ``fingerprint()``. Cache misses are encoded in chunks of ``chunk_size`` items and each
    chunk is committed before the next starts.
    """

    def __init__(self, model, cache_dir: str | os.PathLike | None = None, batch_size: int = 16,
                 chunk_size: int = 2048, show_progress: bool = False):
        self.model = model
        self.batch_size = batch_size
        self.chunk_size = max(batch_size, chunk_size)
        self.show_progress = show_progress
        self.fingerprint = model.fingerprint()
        self.cache = EmbeddingCache(cache_dir, self.fingerprint) if cache_dir is not None else None
        self.stats = EncodeStats()

    def encode(self, items: Sequence[Item], role: str) -> np.ndarray:
        """Embeddings of ``items`` (float32, one row each) in ``role``, from the cache where possible."""
        items = list(items)
        if not items:
            return np.zeros((0, 0), dtype=np.float32)
        if self.cache is None:
            return self._encode(items, role)
        settings = encoding_settings(self.model)  # read per call: limits may change between calls
        video = video_settings(self.model)
        keys = [embedding_key(item, role, item_settings(item, settings, video)) for item in items]
        found = self.cache.get_many(keys)
        missing = [index for index, key in enumerate(keys) if key not in found]
        self.stats.cached += len(items) - len(missing)
        for start in range(0, len(missing), self.chunk_size):
            chunk = missing[start:start + self.chunk_size]
            vectors = self._encode([items[index] for index in chunk], role)
            chunk_keys = [keys[index] for index in chunk]
            self.cache.put_many(chunk_keys, vectors)
            found.update(zip(chunk_keys, vectors))
        dims = {vector.size for vector in found.values()}
        if len(dims) != 1:
            raise EmbeddingCacheError(f"embedding cache {self.cache.path} holds vectors of sizes {sorted(dims)}; "
                                      "delete the file to start a fresh cache")
        return np.stack([found[key] for key in keys]).astype(np.float32, copy=False)

    def close(self) -> None:
        """Close the cache's database connection (the encoder can still be used; it reopens)."""
        if self.cache is not None:
            self.cache.close()

    def _encode(self, items: list[Item], role: str) -> np.ndarray:
        start = time.perf_counter()
        vectors = self.model.encode(items, role=role, batch_size=self.batch_size, show_progress=self.show_progress)
        self.stats.seconds += time.perf_counter() - start
        self.stats.encoded += len(items)
        return np.asarray(vectors, dtype=np.float32)
