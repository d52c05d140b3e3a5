"""A FAISS index of document embeddings that knows which model made them.

Directory layout (``INDEX_DIR``)::

    index.faiss      the FAISS index (inner product on L2-normalised vectors = cosine)
    items.jsonl      one line per vector, in index order: id, text, image, instruction, metadata
    manifest.json    written last: format version, model fingerprint (and where the model
                     came from), dimension, index type and parameters, item count,
                     file sizes and a content hash of the two files above
    shards/          only while a resumable build is running (see :func:`build_index`)

The directory is written to a temporary sibling and swapped in with one rename, so a
reader sees the old complete index or the new complete one, never a half-written one.
``Index.load(dir, model=m)`` refuses a model whose fingerprint differs from the one the
index was built with: its query vectors would live in a different space and every
result would be silently wrong.

Index types: ``flat`` (exact inner product, the default), ``ivf`` (inverted lists,
approximate; ``nlist`` lists, ``nprobe`` searched) and ``hnsw`` (graph; ``hnsw_m``
links per node, ``ef_search`` candidates per search). The approximate types pay off
from roughly a million items upward.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from rematch.data.items import Item, ItemLike, as_items
from rematch.distributed import barrier, is_main_process
from rematch.encoding.shards import encode_in_shards
from rematch.retrieval.rerank import check_rerank, matching_probabilities

FORMAT_VERSION = 1
INDEX_FILE, ITEMS_FILE, MANIFEST_FILE, SHARDS_DIR = "index.faiss", "items.jsonl", "manifest.json", "shards"
INDEX_TYPES = ("flat", "ivf", "hnsw")
MAX_HNSW_M = 512
_OWN_ENTRIES = {INDEX_FILE, ITEMS_FILE, MANIFEST_FILE, SHARDS_DIR}
_RESERVED_FIELDS = {"id", "text", "image", "instruction", "image_in_memory", "video", "video_in_memory"}


class IndexFormatError(ValueError):
    """An index directory is missing, incomplete or damaged."""


class IncompleteIndexError(IndexFormatError):
    """The directory holds an interrupted build (shards, no manifest): rerun the build to resume."""


class ModelMismatchError(ValueError):
    """The model given to an index is not the model its vectors were made with."""


@dataclass(frozen=True)
class SearchHit:
    """One search result: the item's id, its cosine score, its 1-based rank and its stored fields.

    ``rerank_score`` is the matching head's p(Yes) for the hits a search reranked (None for
    the others): the number the new order comes from, shown beside the cosine it replaced.
    """

    id: str
    score: float
    rank: int
    metadata: dict
    rerank_score: float | None = None

    def as_dict(self) -> dict:
        answer = {"rank": self.rank, "id": self.id, "score": self.score}
        if self.rerank_score is not None:
            answer["rerank_score"] = self.rerank_score
        return {**answer, **self.metadata}


@dataclass(frozen=True)
class IndexSpec:
    """Which FAISS structure to build and its parameters."""

    index_type: str = "flat"
    nlist: int | None = None
    """IVF lists; None = about 4 * sqrt(n), capped so each list gets >= 39 training vectors."""
    hnsw_m: int = 32
    nprobe: int = 16
    ef_search: int = 128

    def validate(self) -> None:
        if self.index_type not in INDEX_TYPES:
            raise ValueError(f"index_type must be one of {INDEX_TYPES}, got {self.index_type!r}")
        for name in ("hnsw_m", "nprobe", "ef_search"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.hnsw_m < 2:  # FAISS's HNSW with one link per node crashes the process (segfault)
            raise ValueError(f"hnsw_m (--hnsw-m) must be >= 2, got {self.hnsw_m} (16 to 64 is usual)")
        if self.hnsw_m > MAX_HNSW_M:  # FAISS allocates 2*M links per node up front: M=1e8 exhausts memory
            raise ValueError(f"hnsw_m (--hnsw-m) must be <= {MAX_HNSW_M}, got {self.hnsw_m} (16 to 64 is usual)")
        if self.nlist is not None and self.nlist < 1:
            raise ValueError("nlist must be >= 1")

    def lists_for(self, count: int) -> int:
        if self.nlist is not None:
            return min(self.nlist, count)
        return max(1, min(int(4 * math.sqrt(count)), count // 39))


# ---------------------------------------------------------------------------- the index


class Index:
    """Document vectors in FAISS + their ids and fields + the identity of the model that made them.

    Build with :meth:`build` (in memory) or :func:`build_index` (resumable, on disk),
    reopen with :meth:`load`. :meth:`search` needs the model (given to ``build``/``load``).
    """

    def __init__(self, faiss_index, records: list[dict], manifest: dict, model=None):
        self.faiss_index = faiss_index
        self.records = records
        self.ids = [record["id"] for record in records]
        self.manifest = manifest
        self.model = model
        self._positions: dict[str, int] | None = None

    # ---------------------------------------------------------------- construction

    @classmethod
    def build(cls, model, items: Sequence[ItemLike], ids: Sequence[str] | None = None,
              metadata: Sequence[Mapping] | None = None, *, index_type: str = "flat", nlist: int | None = None,
              hnsw_m: int = 32, batch_size: int = 16, show_progress: bool = False,
              model_source: str | None = None) -> "Index":
        """Encode ``items`` as documents and index them (in memory; :meth:`save` writes it).

        ``ids`` default to "0", "1", ...; ``metadata`` (one dict per item) is returned
        with search hits. For corpora too big to encode in one go, use :func:`build_index`.
        """
        items = as_items(items, "corpus item")
        ids, records = make_records(items, ids, metadata)
        spec = IndexSpec(index_type=index_type, nlist=nlist, hnsw_m=hnsw_m)
        spec.validate()
        vectors = model.encode(items, role="document", batch_size=batch_size, show_progress=show_progress)
        faiss_index = assemble_faiss(lambda: iter([vectors]), len(items), vectors.shape[1], spec)
        manifest = new_manifest(model.fingerprint(), vectors.shape[1], spec, len(items), model_source)
        return cls(faiss_index, records, manifest, model=model)

    @classmethod
    def load(cls, path: str | os.PathLike, model=None, verify: bool = True) -> "Index":
        """Open an index directory; with ``model``, check it is the model the index was built with.

        The files are re-hashed against the manifest's content hash (one full read): damage
        that keeps a file's size, a flipped byte in ``index.faiss`` or an edited id in
        ``items.jsonl``, would otherwise return wrong results silently. ``verify=False``
        skips that for indexes too large to read twice.
        """
        import faiss

        path = Path(path)
        manifest = read_manifest(path)
        for name, size in manifest["files"].items():
            file = path / name
            if not file.is_file() or file.stat().st_size != size:
                raise IndexFormatError(f"{file}: missing or not the size the manifest records ({size} bytes); "
                                       "the index is damaged, rebuild it")
        if verify and content_hash(path) != manifest["content_hash"]:
            raise IndexFormatError(f"{path}: files do not match the manifest's content hash; rebuild the index")
        faiss_index = faiss.read_index(str(path / INDEX_FILE))
        records = [json.loads(line) for line in (path / ITEMS_FILE).read_text(encoding="utf-8").splitlines() if line]
        count, dimension = manifest["count"], manifest["dimension"]
        if faiss_index.ntotal != count or len(records) != count or faiss_index.d != dimension:
            raise IndexFormatError(f"{path}: manifest says {count} x {dimension} but the files hold "
                                   f"{faiss_index.ntotal} vectors of size {faiss_index.d} and {len(records)} items")
        kind = faiss_index_type(faiss_index)
        if kind != manifest["index_type"]:
            raise IndexFormatError(f"{path}: manifest says index_type {manifest['index_type']!r} but {INDEX_FILE} "
                                   f"holds a {kind!r} index; rebuild the index")
        index = cls(faiss_index, records, manifest)
        if model is not None:
            index.attach(model)
        return index

    def attach(self, model) -> "Index":
        """Use ``model`` to encode queries; it must be the model the index was built with."""
        fingerprint = model.fingerprint()
        if fingerprint != self.fingerprint:
            source = self.manifest.get("model_source")
            built_with = f"{self.fingerprint}" + (f" ({source})" if source else "")
            raise ModelMismatchError(
                f"this index was built with model {built_with} but the given model's fingerprint is "
                f"{fingerprint}; its query vectors would not be comparable. Load the model the index was built "
                "with, or rebuild the index with this model.")
        self.model = model
        return self

    def save(self, path: str | os.PathLike) -> None:
        """Write the index directory atomically (an existing index there is replaced)."""
        import faiss

        from rematch.atomic import write_directory_atomically

        path = Path(path).absolute()  # "." has no name to swap a sibling in under
        _check_replaceable(path)

        def write(directory: Path) -> None:
            faiss.write_index(self.faiss_index, str(directory / INDEX_FILE))
            with open(directory / ITEMS_FILE, "w", encoding="utf-8") as handle:
                for record in self.records:
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            manifest = dict(self.manifest)
            manifest["files"] = {name: (directory / name).stat().st_size for name in (INDEX_FILE, ITEMS_FILE)}
            manifest["content_hash"] = content_hash(directory)
            (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
            self.manifest = manifest

        write_directory_atomically(path, write, is_ours=lambda _: True, what="an index")  # checked above

    # ---------------------------------------------------------------- changes

    def add(self, items: Sequence[ItemLike], ids: Sequence[str] | None = None,
            metadata: Sequence[Mapping] | None = None, *, batch_size: int = 16,
            show_progress: bool = False) -> "Index":
        """Encode ``items`` as documents with this index's model and append them (in memory; :meth:`save`
        writes it). Ids must be new; the FAISS structure is rebuilt as a fresh build of every item
        would build it, so results equal that build's. For large additions on disk, resumable, use
        :func:`rematch.retrieval.index_update.add_to_index`."""
        if self.model is None:
            raise ValueError("this index has no model to encode the new items: pass model= to Index.load")
        items = as_items(items, "new item")
        if not items:
            raise ValueError("no items to add")
        ids = [str(len(self) + i) for i in range(len(items))] if ids is None else ids
        _, records = make_records(items, ids, metadata)
        vectors = self.model.encode(items, role="document", batch_size=batch_size, show_progress=show_progress)
        return self.add_vectors(vectors, records)

    def add_vectors(self, vectors: np.ndarray, records: list[dict]) -> "Index":
        """Append already encoded document ``vectors`` (of this index's model) with their ``records``."""
        clash = sorted(set(self.ids) & {record["id"] for record in records})
        if clash:
            raise ValueError(f"the index already holds id(s) {clash[:5]}; delete them first to replace them")
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.shape != (len(records), self.dimension) or not np.isfinite(vectors).all():
            raise ValueError(f"expected {len(records)} finite vectors of size {self.dimension}, got {vectors.shape}")
        return self._rebuild(np.concatenate([self.vectors(), vectors]), self.records + list(records))

    def delete(self, ids: Iterable[str]) -> "Index":
        """Remove the items with these ids (each must be in the index); the FAISS structure is rebuilt
        as a fresh build of the remaining items would build it."""
        doomed = list(dict.fromkeys(str(item_id) for item_id in ids))
        missing = sorted(set(doomed) - set(self.ids))
        if missing:
            raise ValueError(f"no item with id(s) {missing[:5]} in this index; nothing was deleted")
        if len(doomed) == len(self):
            raise ValueError("deleting every item would leave an empty index; build a new one instead")
        gone = set(doomed)
        keep = [position for position, item_id in enumerate(self.ids) if item_id not in gone]
        return self._rebuild(self.vectors()[keep], [self.records[position] for position in keep])

    def vectors(self) -> np.ndarray:
        """Every stored vector, in index order (read back from FAISS: flat, IVF and HNSW all keep them exactly)."""
        import faiss

        if isinstance(self.faiss_index, faiss.IndexIVF):
            self.faiss_index.make_direct_map()
        return self.faiss_index.reconstruct_n(0, self.faiss_index.ntotal)

    def _rebuild(self, vectors: np.ndarray, records: list[dict]) -> "Index":
        spec = spec_of(self.manifest)
        self.faiss_index = assemble_faiss(lambda: iter([vectors]), len(records), self.dimension, spec)
        self.records = records
        self.ids = [record["id"] for record in records]
        self._positions = None
        manifest = new_manifest(self.fingerprint, self.dimension, spec, len(records), self.manifest.get("model_source"))
        manifest["created"] = self.manifest.get("created", manifest["created"])
        manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self.manifest = manifest
        return self

    # ---------------------------------------------------------------- properties

    def __len__(self) -> int:
        return len(self.records)

    @property
    def fingerprint(self) -> str:
        return self.manifest["model_fingerprint"]

    @property
    def dimension(self) -> int:
        return self.manifest["dimension"]

    def item(self, position: int) -> Item:
        """The stored item at ``position`` (as a path item: in-memory images are not stored)."""
        record = self.records[position]
        if record.get("image_in_memory"):
            raise ValueError(f"item {record['id']!r} was indexed from an in-memory image, which is not stored")
        if record.get("video_in_memory"):
            raise ValueError(f"item {record['id']!r} was indexed from in-memory video frames, which are not stored")
        video = record.get("video")
        return Item(text=record.get("text"), image=record.get("image"), instruction=record.get("instruction"),
                    video=tuple(video) if isinstance(video, list) else video)

    # ---------------------------------------------------------------- search

    def search(self, queries: Sequence[ItemLike] | ItemLike, k: int = 10, *, rerank: int = 0,
               nprobe: int | None = None, ef_search: int | None = None,
               batch_size: int = 16) -> list[list[SearchHit]]:
        """Top-``k`` hits for each query (one list per query; a single item counts as one query).

        ``rerank=N`` re-orders the top N with the matching head (p(Yes), see rematch.retrieval.rerank).
        """
        check_rerank(rerank)
        if self.model is None:
            raise ValueError("this index has no model to encode queries: pass model= to Index.load "
                             "(or use search_vectors)")
        items = as_items(queries, "query")
        vectors = self.model.encode(items, role="query", batch_size=batch_size)
        hits = self.search_vectors(vectors, max(k, rerank), nprobe=nprobe, ef_search=ef_search)
        if rerank:
            hits = [self._rerank(query, found, rerank) for query, found in zip(items, hits)]
        return [found[:k] for found in hits]

    def search_vectors(self, vectors: np.ndarray, k: int = 10, *, nprobe: int | None = None,
                       ef_search: int | None = None) -> list[list[SearchHit]]:
        """Top-``k`` hits for query vectors already encoded with this index's model."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dimension:
            raise ValueError(f"query vectors must be (n, {self.dimension}), got {vectors.shape}")
        if not np.isfinite(vectors).all():
            raise FloatingPointError("query vectors hold NaN/inf")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self._set_search_parameters(nprobe, ef_search)
        scores, positions = self.faiss_index.search(vectors, min(k, len(self)))
        results = []
        for row_scores, row_positions in zip(scores, positions):
            hits = []
            for score, position in zip(row_scores, row_positions):
                if position < 0:  # fewer than k reachable (IVF with few probes)
                    continue
                if not math.isfinite(score):
                    raise FloatingPointError(f"non-finite score for item {self.ids[position]!r}")
                record = self.records[position]
                hits.append(SearchHit(id=record["id"], score=float(score), rank=len(hits) + 1,
                                      metadata={k_: v for k_, v in record.items() if k_ != "id"}))
            results.append(hits)
        return results

    def _set_search_parameters(self, nprobe: int | None, ef_search: int | None) -> None:
        import faiss

        params = self.manifest["index_params"]
        kind = self.manifest["index_type"]
        if kind == "ivf":
            faiss.extract_index_ivf(self.faiss_index).nprobe = nprobe or params["nprobe"]
        elif kind == "hnsw":
            self.faiss_index.hnsw.efSearch = ef_search or params["ef_search"]

    def _rerank(self, query: Item, hits: list[SearchHit], top_n: int) -> list[SearchHit]:
        if self._positions is None:
            self._positions = {item_id: position for position, item_id in enumerate(self.ids)}
        head = hits[:top_n]
        probabilities = matching_probabilities(self.model, query, [self.item(self._positions[hit.id]) for hit in head])
        order = np.argsort(-probabilities, kind="stable")  # as rematch.retrieval.rerank.rerank() orders them
        reordered = [SearchHit(head[i].id, head[i].score, 0, head[i].metadata, float(probabilities[i]))
                     for i in order] + hits[top_n:]
        return [SearchHit(hit.id, hit.score, rank, hit.metadata, hit.rerank_score)
                for rank, hit in enumerate(reordered, start=1)]


def faiss_index_type(faiss_index) -> str:
    """Which of :data:`INDEX_TYPES` a FAISS index object is (the manifest must say the same)."""
    import faiss

    if isinstance(faiss_index, faiss.IndexHNSW):
        return "hnsw"
    if isinstance(faiss_index, faiss.IndexIVF):
        return "ivf"
    return "flat" if isinstance(faiss_index, faiss.IndexFlat) else type(faiss_index).__name__


def open_index(path: str | os.PathLike, model_spec: str | None = None, device: str | None = None,
               verify: bool = True) -> Index:
    """Load an index with a model ready to search it: ``model_spec`` (a directory, hub id or
    ``tiny``) or, by default, the model recorded in the manifest; it must match the index.
    ``device`` defaults to CUDA when available."""
    from rematch.model import ReMatchModel

    return Index.load(path, model=ReMatchModel.load(index_model_spec(path, model_spec), device), verify=verify)


def index_model_spec(path: str | os.PathLike, model_spec: str | None = None) -> str:
    """The model to encode queries for the index at ``path``: ``model_spec``, else the manifest's."""
    spec = model_spec or read_manifest(Path(path)).get("model_source")
    if not spec:
        raise IndexFormatError(f"{path}: the manifest records no model source; pass the model explicitly")
    return spec


# ---------------------------------------------------------------------------- pieces shared by both builds


def make_records(items: Sequence[Item], ids: Sequence | None, metadata: Sequence[Mapping] | None
                 ) -> tuple[list[str], list[dict]]:
    """Per-item records stored in items.jsonl; ids must be unique, metadata must not shadow item fields."""
    ids = [str(i) for i in range(len(items))] if ids is None else [str(i) for i in ids]
    if len(ids) != len(items):
        raise ValueError(f"{len(items)} items but {len(ids)} ids")
    if metadata is not None and len(metadata) != len(items):
        raise ValueError(f"{len(items)} items but {len(metadata)} metadata entries")
    seen: dict[str, int] = {}
    records = []
    for position, (item_id, item) in enumerate(zip(ids, items)):
        if item_id in seen:
            raise ValueError(f"duplicate id {item_id!r} at items {seen[item_id]} and {position}")
        seen[item_id] = position
        record: dict = {"id": item_id, "text": item.text, "instruction": item.instruction}
        if isinstance(item.image, (str, os.PathLike)):
            record["image"] = str(item.image)
        else:
            record["image"] = None
            if item.image is not None:
                record["image_in_memory"] = True
        if item.video is not None:  # a file or frame directory, or the paths of listed frames
            if isinstance(item.video, (str, os.PathLike)):
                record["video"] = str(item.video)
            elif all(isinstance(frame, (str, os.PathLike)) for frame in item.video):
                record["video"] = [str(frame) for frame in item.video]
            else:
                record["video_in_memory"] = True
        extra = dict(metadata[position]) if metadata is not None else {}
        clash = _RESERVED_FIELDS & set(extra)
        if clash:
            raise ValueError(f"metadata of item {item_id!r} uses reserved field(s) {sorted(clash)}")
        record.update(extra)
        records.append(record)
    return ids, records


def assemble_faiss(chunks: Callable[[], Iterator[np.ndarray]], count: int, dimension: int, spec: IndexSpec):
    """A FAISS index over the vectors that ``chunks()`` yields (called twice for IVF: train, then add)."""
    import faiss

    if spec.index_type == "flat":
        index = faiss.IndexFlatIP(dimension)
    elif spec.index_type == "hnsw":
        index = faiss.IndexHNSWFlat(dimension, spec.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    else:
        nlist = spec.lists_for(count)
        quantizer = faiss.IndexFlatIP(dimension)
        index = faiss.IndexIVFFlat(quantizer, dimension, nlist, faiss.METRIC_INNER_PRODUCT)  # keeps a reference
        # k-means needs >= 39 points per list; more than ~100k points buys little and costs memory
        stride = max(1, count // min(count, max(39 * nlist, 100_000)))
        sample = np.concatenate([chunk[::stride] for chunk in chunks()])
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
    for chunk in chunks():
        index.add(np.ascontiguousarray(chunk, dtype=np.float32))
    if index.ntotal != count:
        raise RuntimeError(f"indexed {index.ntotal} vectors, expected {count}")
    return index


def spec_of(manifest: Mapping) -> IndexSpec:
    """The :class:`IndexSpec` an index was built with (to rebuild it the same way after a change).

    An IVF index built with the default list count recomputes it for the new count, as a
    fresh build would; one built with ``--nlist`` keeps it.
    """
    params = manifest["index_params"]
    nlist = None if params.get("nlist_auto", False) else params.get("nlist")
    return IndexSpec(index_type=manifest["index_type"], nlist=nlist, hnsw_m=params.get("hnsw_m", 32),
                     nprobe=params.get("nprobe", 16), ef_search=params.get("ef_search", 128))


def new_manifest(fingerprint: str, dimension: int, spec: IndexSpec, count: int, model_source: str | None) -> dict:
    params = {"nprobe": spec.nprobe, "ef_search": spec.ef_search}
    if spec.index_type == "ivf":
        params["nlist"] = spec.lists_for(count)
        params["nlist_auto"] = spec.nlist is None
    if spec.index_type == "hnsw":
        params["hnsw_m"] = spec.hnsw_m
    return {"format_version": FORMAT_VERSION, "model_fingerprint": fingerprint, "model_source": model_source,
            "dimension": int(dimension), "index_type": spec.index_type, "index_params": params, "count": count,
            "similarity": "inner product of L2-normalised vectors (cosine)", "rematch_version": package_version("rematch"),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def content_hash(directory: Path) -> str:
    """sha256 over items.jsonl and index.faiss (in that order)."""
    digest = hashlib.sha256()
    for name in (ITEMS_FILE, INDEX_FILE):
        with open(Path(directory) / name, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def read_manifest(path: Path) -> dict:
    if not path.is_dir():
        raise FileNotFoundError(f"no index directory at {path}")
    file = path / MANIFEST_FILE
    if not file.is_file():
        if (path / SHARDS_DIR).is_dir():
            raise IncompleteIndexError(f"{path}: the index build was interrupted (shards, no manifest); rerun "
                                       "`rematch index build` with the same arguments to resume it")
        raise IndexFormatError(f"{path}: not an index directory (no {MANIFEST_FILE})")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise IndexFormatError(f"{file}: not valid JSON ({error})") from error
    if not isinstance(manifest, dict):
        raise IndexFormatError(f"{file}: expected a JSON object, got {type(manifest).__name__}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise IndexFormatError(f"{file}: format_version {manifest.get('format_version')!r} is not supported "
                               f"(this rematch reads {FORMAT_VERSION})")
    _check_manifest_fields(file, manifest)
    return manifest


#: What loading and searching read from manifest.json, with their JSON types.
MANIFEST_FIELDS = {"model_fingerprint": str, "dimension": int, "index_type": str, "index_params": dict, "count": int,
                   "files": dict, "content_hash": str}


def _check_manifest_fields(file: Path, manifest: dict) -> None:
    """Every field the index is read with, of the right type: an edited or damaged manifest is
    an error naming the field here, not a KeyError or a wrong search parameter later."""
    for key, kind in MANIFEST_FIELDS.items():
        value = manifest.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise IndexFormatError(f"{file}: field {key!r} is missing or not a {kind.__name__} (got {value!r}); "
                                   "the manifest is damaged, rebuild the index")
    if manifest["index_type"] not in INDEX_TYPES:
        raise IndexFormatError(f"{file}: index_type {manifest['index_type']!r} is not one of {INDEX_TYPES}")
    if sorted(manifest["files"]) != sorted((INDEX_FILE, ITEMS_FILE)) or not all(
            isinstance(size, int) and size >= 0 for size in manifest["files"].values()):
        raise IndexFormatError(f"{file}: field 'files' must give the sizes of {INDEX_FILE} and {ITEMS_FILE}")
    source = manifest.get("model_source")
    if source is not None and not isinstance(source, str):
        raise IndexFormatError(f"{file}: field 'model_source' must be a string or null, got {source!r}")


def _check_replaceable(path: Path) -> None:
    """Refuse to swap out a directory that holds anything but an index (it would be deleted)."""
    if path.exists():
        if not path.is_dir():
            raise IndexFormatError(f"{path} exists and is not a directory")
        foreign = sorted(entry.name for entry in path.iterdir() if entry.name not in _OWN_ENTRIES)
        if foreign:
            raise IndexFormatError(f"{path} holds files that are not part of an index ({', '.join(foreign[:5])}); "
                                   "refusing to replace it: choose an empty or new directory")


# ---------------------------------------------------------------------------- resumable build


def build_index(model, items: Sequence[ItemLike], ids: Sequence[str], out_dir: str | os.PathLike, *,
                metadata: Sequence[Mapping] | None = None, index_type: str = "flat", nlist: int | None = None,
                hnsw_m: int = 32, shard_size: int = 4096, batch_size: int = 16, overwrite: bool = False,
                model_source: str | None = None, show_progress: bool = False,
                on_shard_done: Callable[[int, int], None] | None = None,
                log: Callable[[str], None] | None = print) -> Index | None:
    """Encode a corpus in shards and write a complete index to ``out_dir``; rerunning resumes.

    Each shard of ``shard_size`` items is written to ``out_dir/shards/`` atomically, with
    the model fingerprint and a hash of its content. A rerun reuses every shard whose
    model and content still match and encodes the rest, so an interrupted build
    continues from where it stopped (and an item fixed in between is re-encoded). Only
    when all shards exist is the FAISS index assembled and the finished directory
    swapped in; until then ``out_dir`` holds no manifest and cannot be loaded.
    ``on_shard_done(shard, num_shards)`` is called after each newly encoded shard.

    Under ``torchrun`` each rank encodes its share of the shards (see
    :mod:`rematch.encoding.shards`); rank 0 assembles and writes the index and returns
    it, the other ranks return None once it is written.
    """
    say = log or (lambda _: None)
    out = Path(out_dir)
    if (out / MANIFEST_FILE).exists() and not overwrite:
        raise FileExistsError(f"{out} already holds an index; pass overwrite=True (--overwrite) to replace it")
    _check_replaceable(out)
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    spec = IndexSpec(index_type=index_type, nlist=nlist, hnsw_m=hnsw_m)
    spec.validate()
    items = as_items(items, "corpus item")
    ids, records = make_records(items, ids, metadata)
    if not items:
        raise ValueError("the corpus is empty")
    shards_dir = out / SHARDS_DIR
    result = encode_in_shards(model, items, ids, shards_dir, role="document", shard_size=shard_size,
                              batch_size=batch_size, show_progress=show_progress, on_shard_done=on_shard_done,
                              log=log)
    if not is_main_process():  # under torchrun rank 0 assembles and writes; the others wait for it
        barrier()
        return None
    if result.reused:
        say(f"reused {result.reused} of {len(result.files)} finished shard(s) from {shards_dir}")
    if result.encoded:
        say(f"encoded {result.encoded} items in {result.seconds:.1f}s "
            f"({result.encoded / max(result.seconds, 1e-9):.1f} items/s)")
    fingerprint, dimension = model.fingerprint(), result.dimension
    faiss_index = assemble_faiss(result.chunks, len(items), dimension, spec)
    index = Index(faiss_index, records, new_manifest(fingerprint, dimension, spec, len(items), model_source),
                  model=model)
    index.save(out)  # swaps the finished directory in; the shards go with the old one
    say(f"wrote a {spec.index_type} index of {len(items)} items to {out}")
    barrier()
    return index


def iter_shard_files(out_dir: str | os.PathLike) -> Iterable[Path]:
    """The shard files of a build in progress (for inspection and tests)."""
    return sorted((Path(out_dir) / SHARDS_DIR).glob("shard-*.npz"))
