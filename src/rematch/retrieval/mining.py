"""Hard-negative mining for MMEB-train-style data (``rematch mine``).

MMEB-train ships no hard negatives, and the ReMatch paper trains with one per sample.
This module finds them with a model, one subset at a time:

1. read every row of the subset (all columns kept) and parse it with the MMEB-train
   reader, so a bad row stops the run naming file, row and field (or, with
   ``skip_bad``, is left out of the output and counted);
2. the *candidates* are the subset's unique targets: the positives of all its rows,
   de-duplicated by content (a negative from the same task and of the same form);
3. encode candidates as documents (with their subset's document instruction, see
   :mod:`rematch.instructions`) and queries as queries, in shards cached on disk
   (``OUT/.mining/<split>/<Subset>/shards/``), so a killed run re-encodes nothing it finished;
4. FAISS top-k for every query; drop the positive and its near-duplicates (an item
   with an image is identified by its image *bytes*, a text-only item by its
   normalised text); number the rest 1, 2, ...; keep ranks ``a..b`` (``rank_window``,
   or ``vqa_rank_window`` for a VQA subset: the top ranks are often unlabelled positives);
5. drop candidates scoring above ``max_ratio`` x the positive's score: the
   positive-aware ceiling of NV-Retriever ("TopK-PercPos", 0.95), which removes
   likely false negatives without a hand-tuned absolute threshold;
6. draw ``per_row`` of what is left, with a generator seeded by (seed, subset, row),
   so the choice for a row never depends on which rows ran before a crash;
7. write ``OUT/<Subset>/<split>.jsonl`` atomically, then the subset's report; a
   rerun skips a subset whose report matches its input, settings and model.

Output rows keep every input column; image paths (``qry_image_path``,
``pos_image_path``, the new ``neg_image_path``) are written *absolute*, so they resolve
whatever image root a reader uses (``os.path.join(root, "/abs")`` is ``"/abs"``) and no
image is copied. Columns describing the input's own negatives (every ``neg_*`` column,
e.g. the shapes world's ``neg_scene``) move to ``source_neg_*``; ``mined_neg_rank``,
``mined_neg_score`` and ``mined_pos_score`` record what the miner saw.

``strategy="random"`` draws uniformly among the non-duplicate candidates instead: the
control that mined negatives are compared against (it needs no model).

Presets (:func:`mining_preset`, ``rematch mine --preset``), two published recipes:

* ``"nv"`` (the default, this module's first recipe): ranks 5-30 under the 0.95 x positive
  ceiling (NV-Retriever's positive-aware filter), with any model, e.g. a first-stage one;
* ``"b3"``: B3's windows, ranks 30-130 (70-170 for VQA subsets, whose short answers repeat
  near the top more often), no ceiling: B3 mines with a strong *teacher* and skips its first
  ranks as likely false negatives instead of filtering by score. The teacher is the model
  passed in (any ReMatch model; a stronger one than the model being trained is the point).
  A subset with fewer candidates than the window's start (HatefulMemes' two answers,
  VOC2007's 20 labels) gets no mined negative under these windows; its rows are counted as
  ``without`` and train with in-batch negatives.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
import unicodedata
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from rematch.outputs import claim_outputs
from rematch.atomic import write_atomically, write_json_atomically, write_npz_atomically
from rematch.data.items import IMAGE_PLACEHOLDER, Item
from rematch.data.mmeb import RowParser, SubsetSource, find_subsets
from rematch.data.mmeb_subsets import VQA, read_manifest_subsets, subset_info
from rematch.data.records import TrainExample
from rematch.data.validation import BadRowReport, DataError
from rematch.instructions import document_items
from rematch.encoding.shards import load_finished_shard, shard_hash

FORMAT_VERSION = 1
STATE_DIR = ".mining"
REPORT_FILE = "mining_report.json"
STRATEGIES = ("mined", "random")
_QUERY_BLOCK = 1024  # queries per FAISS search call
_PICK, _BASELINE = 0, 1  # random streams of a row: the pick itself, the random-negative baseline


class MiningError(ValueError):
    """A mining run was asked for something it cannot do (bad settings, output over the input...)."""


# ====================================================================== settings


@dataclass(frozen=True)
class MiningSettings:
    """What to mine. Everything here changes the output, so it is part of a subset's signature."""

    rank_window: tuple[int, int] = (5, 30)
    """Candidate ranks a..b (1-based, inclusive) counted after removing the positive and its duplicates."""
    per_row: int = 1
    """Negatives per row (written as lists in neg_text / neg_image_path when > 1)."""
    max_ratio: float | None = 0.95
    """Drop candidates scoring above max_ratio x the positive's score (None: no ceiling)."""
    seed: int = 0
    strategy: str = "mined"
    """"mined" (model top-k) or "random" (uniform among non-duplicate candidates)."""
    vqa_rank_window: tuple[int, int] | None = None
    """The window of VQA subsets (their meta-task in MMEB's table or the data root's manifest);
    None: ``rank_window`` for every subset."""

    def window_for(self, meta_task: str) -> tuple[int, int]:
        """The rank window of a subset of ``meta_task``."""
        return self.vqa_rank_window if meta_task == VQA and self.vqa_rank_window is not None else self.rank_window

    def validate(self) -> None:
        for name in ("rank_window", "vqa_rank_window"):
            window = getattr(self, name)
            if window is None and name == "vqa_rank_window":
                continue
            first, last = window
            if not (isinstance(first, int) and isinstance(last, int)) or first < 1 or last < first:
                raise MiningError(f"{name} must be a:b with 1 <= a <= b, got {first}:{last}")
        if self.per_row < 1:
            raise MiningError(f"per_row must be >= 1, got {self.per_row}")
        if self.max_ratio is not None and not (math.isfinite(self.max_ratio) and self.max_ratio > 0):
            raise MiningError(f"max_ratio must be a positive number (or None for no ceiling), got {self.max_ratio}")
        if self.strategy not in STRATEGIES:
            raise MiningError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")


#: The mining presets (module docstring): the settings each one fixes.
PRESETS: dict[str, dict[str, Any]] = {
    "nv": {"rank_window": (5, 30), "vqa_rank_window": None, "max_ratio": 0.95},
    "b3": {"rank_window": (30, 130), "vqa_rank_window": (70, 170), "max_ratio": None},
}


def mining_preset(name: str, **overrides: Any) -> MiningSettings:
    """The settings of preset ``name`` ("nv" or "b3"), with any field overridden (e.g. ``seed``)."""
    if name not in PRESETS:
        raise MiningError(f"unknown mining preset {name!r}; choose one of {', '.join(PRESETS)}")
    settings = MiningSettings(**{**PRESETS[name], **overrides})
    settings.validate()
    return settings


def parse_rank_window(text: str) -> tuple[int, int]:
    """``"5:30"`` -> (5, 30)."""
    parts = text.split(":")
    try:
        first, last = (int(part) for part in parts)
    except ValueError:
        raise MiningError(f"rank window must look like A:B (e.g. 5:30), got {text!r}") from None
    MiningSettings(rank_window=(first, last)).validate()
    return first, last


# ====================================================================== content identity


def normalise_text(text: str | None) -> str:
    """Text compared for near-duplicates: placeholders removed, NFKC, case-folded, whitespace collapsed."""
    if not text:
        return ""
    text = unicodedata.normalize("NFKC", IMAGE_PLACEHOLDER.sub(" ", text)).casefold()
    return " ".join(text.split())


class ContentKeys:
    """Content identities of items; each image file is hashed once.

    ``exact`` de-duplicates the candidate pool (same normalised text and same image
    bytes). ``duplicate`` decides what counts as "the positive again": for an item
    with an image the image bytes alone (targets of a subset usually share one
    instruction text, e.g. "Represent the given image."), otherwise the normalised text.
    """

    def __init__(self):
        self._digests: dict[str, str] = {}

    def image_digest(self, item: Item) -> str:
        if item.image is None:
            return ""
        if not isinstance(item.image, (str, os.PathLike)):
            raise TypeError("mining reads images from files; got an in-memory image")
        path = os.path.abspath(item.image)
        digest = self._digests.get(path)
        if digest is None:
            hasher = hashlib.sha256()
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    hasher.update(block)
            digest = self._digests[path] = hasher.hexdigest()
        return digest

    def exact(self, item: Item) -> str:
        return f"{normalise_text(item.text)}\x00{self.image_digest(item)}"

    def duplicate(self, item: Item) -> str:
        digest = self.image_digest(item)
        return f"image:{digest}" if digest else f"text:{normalise_text(item.text)}"


# ====================================================================== one subset's rows and candidates


@dataclass
class SubsetRows:
    """The usable rows of one subset, as read (for writing back) and as parsed (for encoding)."""

    name: str
    source: str
    raw: list[dict]
    examples: list[TrainExample]
    bad_rows: int
    digest: str
    """sha256 over the raw rows: the input's identity in a subset's signature."""


def read_subset(sub: SubsetSource, skip_bad: bool = False, strip_orphan_placeholders: bool = False) -> SubsetRows:
    """Every row of one subset with all its columns; bad rows raise :class:`DataError` or are counted."""
    store = sub.open(columns=None)
    parser = RowParser(sub.name, sub.image_root, strip_orphan_placeholders=strip_orphan_placeholders)
    report = BadRowReport()
    raw, examples, bad = [], [], 0
    digest = hashlib.sha256()
    try:
        for index, row in store.iter_rows():
            parsed = parser.train(row, store.ref(index))
            if parsed.problems:
                report.handle(parsed.problems[0], skip_bad)  # raises unless skip_bad
                bad += 1
                continue
            row = _jsonable(row, f"{store.ref(index)}")
            raw.append(row)
            examples.append(parsed.record)
            digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode("utf-8") + b"\n")
    finally:
        store.close()
    if not raw:
        raise DataError(f"{sub.location}: no usable rows" + (f" ({bad} bad rows skipped)" if bad else ""))
    return SubsetRows(sub.name, sub.location, raw, examples, bad, digest.hexdigest())


@dataclass
class CandidatePool:
    """A subset's unique targets, and for every row the pool position of its positive."""

    items: list[Item]
    groups: np.ndarray
    """Per candidate: an integer id of its duplicate key (equal ids = near-duplicates)."""
    positive_of_row: np.ndarray
    group_sizes: np.ndarray

    def __len__(self) -> int:
        return len(self.items)


def build_pool(examples: Sequence[TrainExample], keys: ContentKeys) -> CandidatePool:
    """The unique positives of ``examples`` (first occurrence kept), grouped by near-duplicate key."""
    position: dict[str, int] = {}
    group_ids: dict[str, int] = {}
    items, groups, positives = [], [], []
    for example in examples:
        exact = keys.exact(example.positive)
        if exact not in position:
            position[exact] = len(items)
            items.append(example.positive)
            groups.append(group_ids.setdefault(keys.duplicate(example.positive), len(group_ids)))
        positives.append(position[exact])
    groups_array = np.asarray(groups, dtype=np.int64)
    return CandidatePool(items, groups_array, np.asarray(positives, dtype=np.int64),
                         np.bincount(groups_array, minlength=len(group_ids)))


# ====================================================================== resumable encoding


def encode_in_shards(model, items: Sequence[Item], role: str, directory: Path, *, shard_size: int = 2048,
                     batch_size: int = 16, show_progress: bool = False,
                     on_shard_done: Callable[[str, int, int], None] | None = None) -> tuple[np.ndarray, int]:
    """Embeddings of ``items`` in ``role``, shard by shard; returns (vectors, items encoded now).

    Each shard is written atomically with the model fingerprint and a hash of its
    content (item, image file stamp), and reused when both still match: a killed run
    resumes at the first unfinished shard, and shard boundaries (hence batches, hence
    the exact floats) are the same as in an uninterrupted run.
    """
    fingerprint = model.fingerprint()
    bounds = [(start, min(len(items), start + shard_size)) for start in range(0, len(items), shard_size)]
    chunks, encoded = [], 0
    for number, (start, stop) in enumerate(bounds):
        file = directory / f"{role}-{number:06d}.npz"
        expected = shard_hash([f"{role}/{i}" for i in range(start, stop)], items[start:stop])
        vectors = load_finished_shard(file, fingerprint, expected, stop - start)
        if vectors is None:
            vectors = np.asarray(model.encode(items[start:stop], role=role, batch_size=batch_size,
                                              show_progress=show_progress), dtype=np.float32)
            if not np.isfinite(vectors).all():
                raise FloatingPointError(f"non-finite {role} embedding in items {start}..{stop - 1}")
            write_npz_atomically(file, vectors=vectors, fingerprint=np.array(fingerprint),
                                 content_hash=np.array(expected))
            encoded += stop - start
            if on_shard_done is not None:
                on_shard_done(role, number, len(bounds))
        chunks.append(vectors)
    return np.ascontiguousarray(np.concatenate(chunks), dtype=np.float32), encoded


# ====================================================================== choosing negatives


@dataclass
class RowChoice:
    """The negatives chosen for one row (pool positions, their ranks and scores) and what was dropped."""

    negatives: list[int] = field(default_factory=list)
    ranks: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    near_duplicates: int = 0
    over_ceiling: int = 0


def row_generator(seed: int, subset: str, row: int, stream: int) -> np.random.Generator:
    """The random stream of one row: independent of every other row, so resuming cannot shift it."""
    return np.random.default_rng([seed, zlib.crc32(subset.encode("utf-8")), row, stream])


def choose_mined(queries: np.ndarray, candidates: np.ndarray, pool: CandidatePool, settings: MiningSettings,
                 subset: str) -> list[RowChoice]:
    """Per row: FAISS top-k, positive and near-duplicates removed, rank window, ceiling, seeded draw."""
    import faiss

    index = faiss.IndexFlatIP(candidates.shape[1])
    index.add(candidates)
    first, last = settings.rank_window
    k = int(min(len(pool), last + pool.group_sizes.max()))  # enough to keep `last` after removing duplicates
    positive_scores = np.einsum("ij,ij->i", queries, candidates[pool.positive_of_row])
    choices = []
    for start in range(0, len(queries), _QUERY_BLOCK):
        scores, positions = index.search(queries[start:start + _QUERY_BLOCK], k)
        for offset, (row_scores, row_positions) in enumerate(zip(scores, positions)):
            row = start + offset
            valid = row_positions >= 0
            row_scores, row_positions = row_scores[valid], row_positions[valid]
            order = np.lexsort((row_positions, -row_scores))  # score descending, ties by position
            choices.append(_choose_from_ranking(row_scores[order], row_positions[order], row,
                                                float(positive_scores[row]), pool, settings, subset))
    return choices


def _choose_from_ranking(scores: np.ndarray, positions: np.ndarray, row: int, positive_score: float,
                         pool: CandidatePool, settings: MiningSettings, subset: str) -> RowChoice:
    positive = int(pool.positive_of_row[row])
    duplicate = pool.groups[positions] == pool.groups[positive]
    choice = RowChoice(near_duplicates=int(duplicate.sum()) - int((positions == positive).any()))
    scores, positions = scores[~duplicate], positions[~duplicate]
    first, last = settings.rank_window
    window = range(first - 1, min(last, len(positions)))
    ceiling = settings.max_ratio * positive_score if settings.max_ratio is not None else math.inf
    eligible = [rank for rank in window if float(scores[rank]) <= ceiling]
    choice.over_ceiling = len(window) - len(eligible)
    if eligible:
        generator = row_generator(settings.seed, subset, row, _PICK)
        picked = sorted(generator.choice(len(eligible), size=min(settings.per_row, len(eligible)), replace=False))
        for index in picked:
            rank = eligible[int(index)]
            choice.negatives.append(int(positions[rank]))
            choice.ranks.append(rank + 1)
            choice.scores.append(float(scores[rank]))
    return choice


def choose_random(pool: CandidatePool, rows: int, count: int, seed: int, subset: str, stream: int) -> list[RowChoice]:
    """Per row: ``count`` distinct candidates drawn uniformly among those that are not the positive's duplicates."""
    choices = []
    size = len(pool)
    for row in range(rows):
        positive_group = pool.groups[pool.positive_of_row[row]]
        allowed = size - int(pool.group_sizes[positive_group])
        want = min(count, allowed)
        generator = row_generator(seed, subset, row, stream)
        picked: list[int] = []
        if want and allowed < size / 20:  # few allowed: list them rather than reject most draws
            options = np.flatnonzero(pool.groups != positive_group)
            picked = [int(options[i]) for i in generator.choice(len(options), size=want, replace=False)]
        while len(picked) < want:
            position = int(generator.integers(size))
            if pool.groups[position] != positive_group and position not in picked:
                picked.append(position)
        choices.append(RowChoice(negatives=picked))
    return choices


# ====================================================================== writing


@dataclass
class SubsetReport:
    """What mining did to one subset. Rows without a usable negative are counted, never dropped."""

    subset: str
    rows: int
    candidates: int
    with_negatives: int
    """Rows that got at least one negative."""
    short: int
    """Rows that got some negatives but fewer than per_row."""
    without: int
    """Rows that got none (written with empty neg_text / neg_image_path)."""
    bad_rows: int
    near_duplicates_dropped: int
    over_ceiling_dropped: int
    nonpositive_positive_scores: int
    """Rows whose positive scored <= 0: the ratio ceiling assumes positive scores above 0."""
    mean_query_positive: float | None
    mean_query_negative: float | None
    mean_query_random: float | None
    """Mean similarity of each row's query to one random non-duplicate candidate: the baseline."""
    items_encoded: int
    seconds: float
    output: str
    output_sha256: str
    signature: str


def _jsonable(value: Any, where: str) -> Any:
    """A raw cell as plain JSON (numpy arrays from parquet become lists; NaN means missing)."""
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item, where) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item, where) for item in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return _jsonable(value.tolist(), where)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (bytes, bytearray)):
        raise DataError(f"{where}: a column holds raw bytes (an embedded image?); mining writes jsonl rows and "
                        "needs image paths")
    return value


def _absolute(path: Any, image_root: str | None) -> Any:
    """A row's image path(s) made absolute against the image root ('' and None stay as they are)."""
    if isinstance(path, list):
        return [_absolute(item, image_root) for item in path]
    if not isinstance(path, str) or not path.strip():
        return path
    return os.path.abspath(os.path.join(image_root, path) if image_root is not None else path)


def output_row(raw: Mapping[str, Any], choice: RowChoice, pool: CandidatePool, per_row: int,
               image_root: str | None, positive_score: float | None) -> dict:
    """The input row with absolute image paths, its old negatives under source_*, and the new ones."""
    row: dict[str, Any] = {}
    for key, value in raw.items():
        if key.startswith("mined_") or (key.startswith("source_neg_") and key[len("source_"):] in raw):
            continue  # a previous mining pass's record, superseded by this one
        if key.startswith("neg_"):
            row[f"source_{key}"] = _absolute(value, image_root) if key == "neg_image_path" else value
        elif key in ("qry_image_path", "pos_image_path"):
            row[key] = _absolute(value, image_root)
        else:
            row[key] = value
    texts = [pool.items[c].text or "" for c in choice.negatives]
    images = [os.path.abspath(pool.items[c].image) if pool.items[c].image is not None else ""
              for c in choice.negatives]
    if per_row == 1:
        row["neg_text"], row["neg_image_path"] = (texts[0], images[0]) if texts else ("", "")
    else:
        row["neg_text"], row["neg_image_path"] = texts, images
    row["mined_neg_rank"] = choice.ranks
    row["mined_neg_score"] = [round(score, 6) for score in choice.scores]
    row["mined_pos_score"] = round(positive_score, 6) if positive_score is not None else None
    return row


def write_rows(path: Path, rows: Sequence[Mapping[str, Any]]) -> str:
    """Write jsonl atomically; returns the file's sha256."""
    digest = hashlib.sha256()

    def write(handle) -> None:
        for row in rows:
            line = (json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
            digest.update(line)
            handle.write(line)

    write_atomically(path, write)
    return digest.hexdigest()


# ====================================================================== the whole run


@dataclass
class MiningResult:
    out: Path
    subsets: list[SubsetReport]
    """This run's subsets, in order (``report_path`` lists every subset mined into ``out`` so far)."""
    resumed: list[str]
    """Subsets this run found finished (same input, settings and model) and kept."""
    report_path: Path


def mine_negatives(model, source: str | os.PathLike, out: str | os.PathLike,
                   settings: MiningSettings | str = MiningSettings(), *, subsets: Sequence[str] | None = None,
                   split: str = "train", image_root: str | os.PathLike | None = None, batch_size: int = 16,
                   shard_size: int = 2048, skip_bad: bool = False, strip_orphan_placeholders: bool = False,
                   keep_embeddings: bool = False, model_source: str | None = None, show_progress: bool = False,
                   preset: str | None = None, on_shard_done: Callable[[str, int, int], None] | None = None,
                   log: Callable[[str], None] | None = print) -> MiningResult:
    """Mine negatives for every subset of ``source`` into ``out`` (same layout); rerunning resumes.

    ``model`` ranks the candidates (the teacher of the "b3" preset) and may be None only for
    ``strategy="random"`` (then no similarities are reported). ``settings`` may be a preset
    name (:func:`mining_preset`). ``on_shard_done(role, shard, shards)`` runs after each newly
    encoded shard.
    """
    say = log or (lambda _: None)
    preset = settings if isinstance(settings, str) else preset  # recorded in the report
    settings = mining_preset(settings) if isinstance(settings, str) else settings
    settings.validate()
    if shard_size < 1:
        raise MiningError(f"shard_size must be >= 1, got {shard_size}")
    if model is None and settings.strategy == "mined":
        raise MiningError("mining needs a model (only strategy='random' runs without one)")
    out = Path(out).absolute()
    if Path(source).exists() and Path(source).resolve() in (out.resolve(), *out.resolve().parents):
        raise MiningError(f"the output (--out) {out} must not be the source data (--data) {source} or inside it: "
                          "it would overwrite the input")
    found = find_subsets(source, split, subsets, image_root)
    outputs = claim_outputs(out, "mine", [sub.name for sub in found] + [STATE_DIR, REPORT_FILE],
                            adopt=_earlier_mining)  # new, empty or an earlier mining output, before any work
    declared = read_manifest_subsets(source) if Path(source).is_dir() else {}
    fingerprint = model.fingerprint() if model is not None else None
    keys = ContentKeys()
    reports, resumed = [], []
    for sub in found:
        report, kept = _mine_subset(model, fingerprint, sub, out, split, settings, keys,
                                    meta_task=subset_info(sub.name, declared).meta_task, batch_size=batch_size,
                                    shard_size=shard_size, skip_bad=skip_bad,
                                    strip_orphan_placeholders=strip_orphan_placeholders,
                                    keep_embeddings=keep_embeddings, show_progress=show_progress,
                                    on_shard_done=on_shard_done, say=say)
        reports.append(report)
        if kept:
            resumed.append(sub.name)
    report_path = out / REPORT_FILE
    write_json_atomically(report_path, {
        "format_version": FORMAT_VERSION, "source": str(source), "split": split, "model": model_source,
        "model_fingerprint": fingerprint, "preset": preset, "settings": _settings_dict(settings),
        "image_paths": "absolute",
        "subsets": {r.subset: asdict(r) for r in _finished_reports(out, split)}})
    outputs.seal()
    return MiningResult(out, reports, resumed, report_path)


def _earlier_mining(out: Path) -> set[str]:
    """An output root mined before output markers: its report, the state folder and the subsets
    the report lists (anything else in it is left alone, as the user's)."""
    try:
        report = json.loads((out / REPORT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    if not (isinstance(report, dict) and "format_version" in report and isinstance(report.get("subsets"), dict)):
        return set()
    return {REPORT_FILE, STATE_DIR} | {str(name) for name in report["subsets"]}


def _mine_subset(model, fingerprint: str | None, sub: SubsetSource, out: Path, split: str,
                 settings: MiningSettings, keys: ContentKeys, *, meta_task: str, batch_size: int, shard_size: int,
                 skip_bad: bool,
                 strip_orphan_placeholders: bool, keep_embeddings: bool, show_progress: bool,
                 on_shard_done, say) -> tuple[SubsetReport, bool]:
    """Mine one subset and write it; (report, True) when a finished identical run was found and kept."""
    began = time.perf_counter()
    state = out / STATE_DIR / split / sub.name
    target = out / sub.name / f"{split}.jsonl"
    rows = read_subset(sub, skip_bad=skip_bad, strip_orphan_placeholders=strip_orphan_placeholders)
    image_root = os.path.abspath(sub.image_root) if sub.image_root is not None else None
    signature = hashlib.sha256(json.dumps({
        "format_version": FORMAT_VERSION, "settings": _settings_dict(settings), "model": fingerprint,
        "rows": rows.digest, "image_root": image_root, "strip_orphan_placeholders": strip_orphan_placeholders,
    }, sort_keys=True).encode("utf-8")).hexdigest()
    previous = _load_report(state / "report.json")
    if previous is not None and previous.signature == signature and _file_sha256(target) == previous.output_sha256:
        say(f"{sub.name}: already mined with these settings and this model ({target}); kept")
        previous.output = str(target)
        return previous, True

    pool = build_pool(rows.examples, keys)
    queries = candidates = None
    encoded = 0
    if model is not None:
        # Candidates are encoded as training encodes positives: with their subset's document instruction.
        documents = document_items(pool.items, sub.name, model.config)
        candidates, count = encode_in_shards(model, documents, "document", state / "shards",
                                             shard_size=shard_size, batch_size=batch_size,
                                             show_progress=show_progress, on_shard_done=on_shard_done)
        encoded += count
        queries, count = encode_in_shards(model, [e.query for e in rows.examples], "query", state / "shards",
                                          shard_size=shard_size, batch_size=batch_size, show_progress=show_progress,
                                          on_shard_done=on_shard_done)
        encoded += count
    if settings.strategy == "mined":
        window = settings.window_for(meta_task)  # this subset's window (VQA subsets may have their own)
        own = dataclasses.replace(settings, rank_window=window, vqa_rank_window=None)
        choices = choose_mined(queries, candidates, pool, own, sub.name)
    else:
        choices = choose_random(pool, len(rows.raw), settings.per_row, settings.seed, sub.name, _PICK)
    baseline = choose_random(pool, len(rows.raw), 1, settings.seed, sub.name, _BASELINE)

    positive_scores = similarities = None
    if model is not None:
        positive_scores = np.einsum("ij,ij->i", queries, candidates[pool.positive_of_row])
        similarities = _mean_similarities(queries, candidates, positive_scores, choices, baseline)
    written = [output_row(raw, choice, pool, settings.per_row, image_root,
                          float(positive_scores[row]) if positive_scores is not None else None)
               for row, (raw, choice) in enumerate(zip(rows.raw, choices))]
    output_hash = write_rows(target, written)
    counts = [len(choice.negatives) for choice in choices]
    report = SubsetReport(
        subset=sub.name, rows=len(rows.raw), candidates=len(pool),
        with_negatives=sum(n > 0 for n in counts), short=sum(0 < n < settings.per_row for n in counts),
        without=sum(n == 0 for n in counts), bad_rows=rows.bad_rows,
        near_duplicates_dropped=sum(c.near_duplicates for c in choices),
        over_ceiling_dropped=sum(c.over_ceiling for c in choices),
        nonpositive_positive_scores=int((positive_scores <= 0).sum()) if positive_scores is not None else 0,
        **(similarities or dict.fromkeys(("mean_query_positive", "mean_query_negative", "mean_query_random"))),
        items_encoded=encoded, seconds=round(time.perf_counter() - began, 2), output=str(target),
        output_sha256=output_hash, signature=signature)
    write_json_atomically(state / "report.json", asdict(report))
    if not keep_embeddings:
        shutil.rmtree(state / "shards", ignore_errors=True)
    say(f"{sub.name}: {report.with_negatives}/{report.rows} rows got negatives ({report.without} without) "
        f"-> {target}")
    if report.without and report.over_ceiling_dropped:
        say(f"{sub.name}: the ceiling ({settings.max_ratio} x the positive's score) dropped "
            f"{report.over_ceiling_dropped} candidates; queries score their positive at "
            f"{report.mean_query_positive:+.3f} and a random target at {report.mean_query_random:+.3f} on average. "
            "If these are close, the model barely separates positives from the rest: mine with a better-trained "
            "model, or relax --max-ratio")
    return report, False


def _mean_similarities(queries: np.ndarray, candidates: np.ndarray, positive_scores: np.ndarray,
                       choices: list[RowChoice], baseline: list[RowChoice]) -> dict[str, float | None]:
    """Mean query-positive, query-negative and query-random-candidate similarity of a subset."""
    for choice, vector in zip(choices, queries):
        if not choice.scores and choice.negatives:  # random picks carry no score yet
            choice.scores = [float(score) for score in candidates[choice.negatives] @ vector]
    random_scores = [float(candidates[c.negatives[0]] @ vector) for c, vector in zip(baseline, queries)
                     if c.negatives]
    return {"mean_query_positive": _mean(positive_scores),
            "mean_query_negative": _mean([score for choice in choices for score in choice.scores]),
            "mean_query_random": _mean(random_scores)}


def _mean(values) -> float | None:
    if values is None or len(values) == 0:
        return None
    return round(float(np.mean(values)), 6)


def _settings_dict(settings: MiningSettings) -> dict:
    data = asdict(settings)
    data["rank_window"] = list(settings.rank_window)
    if settings.vqa_rank_window is None:  # as before VQA windows existed: finished subsets keep their signature
        del data["vqa_rank_window"]
    else:
        data["vqa_rank_window"] = list(settings.vqa_rank_window)
    return data


def _file_sha256(path: Path) -> str | None:
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _load_report(path: Path) -> SubsetReport | None:
    try:
        return SubsetReport(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None  # absent or from another version: mine the subset again


def _finished_reports(out: Path, split: str) -> list[SubsetReport]:
    """Reports of every subset whose output file in ``out`` is the one its report describes."""
    reports = []
    for file in sorted((out / STATE_DIR / split).glob("*/report.json")):
        report = _load_report(file)
        output = out / file.parent.name / f"{split}.jsonl"
        if report is not None and _file_sha256(output) == report.output_sha256:
            report.output = str(output)  # where it is now (the directory may have moved)
            reports.append(report)
    return reports


def format_report(result: MiningResult) -> str:
    """A table: per subset, rows, candidates, rows with/without negatives and mean query similarities."""
    def number(value: float | None) -> str:
        return f"{value:+.3f}" if value is not None else "   -  "

    lines = [f"{'subset':<16} {'rows':>7} {'cands':>7} {'mined':>7} {'short':>6} {'none':>6} {'bad':>5} "
             f"{'q.pos':>7} {'q.neg':>7} {'q.rand':>7}"]
    for r in result.subsets:
        lines.append(f"{r.subset:<16} {r.rows:>7} {r.candidates:>7} {r.with_negatives:>7} {r.short:>6} "
                     f"{r.without:>6} {r.bad_rows:>5} {number(r.mean_query_positive):>7} "
                     f"{number(r.mean_query_negative):>7} {number(r.mean_query_random):>7}")
    return "\n".join(lines)


__all__ = ["PRESETS", "CandidatePool", "ContentKeys", "MiningError", "MiningResult", "MiningSettings", "RowChoice",
           "SubsetReport", "build_pool", "choose_mined", "choose_random", "encode_in_shards", "format_report",
           "mine_negatives", "mining_preset", "normalise_text", "parse_rank_window", "read_subset"]
