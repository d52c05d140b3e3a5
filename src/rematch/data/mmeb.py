"""Read MMEB-style data: training pairs (MMEB-train schema) and evaluation sets (MMEB-eval schema).

Where the rows come from:

* a local directory ``ROOT/<Subset>/<split>.jsonl|.parquet|.csv`` (also the sharded
  ``<split>-00000-of-00001.parquet`` files of a Hugging Face snapshot, and
  ``<split>/`` directories written by ``datasets.Dataset.save_to_disk``);
* a single user file in the same schema (its subset is the file name's stem);
* a Hugging Face dataset id such as ``TIGER-Lab/MMEB-train`` (loaded memory-mapped; online).

The two schemas (MMEB, arXiv 2410.05160)::

    train: qry, qry_image_path, pos_text, pos_image_path[, neg_text, neg_image_path]
    eval:  qry_text, qry_img_path, tgt_text (list), tgt_img_path (list); candidate 0 is correct

Texts carry the instruction and, where the side has an image, one ``<|image_1|>``
placeholder (the backbone adapter maps it to its image slot). Image paths are relative to
an image root. Extra columns are ignored. Rows are parsed one at a time and images are
only *checked for existence* here; they are opened in the collate step.

Every row is validated; a bad row raises :class:`~rematch.data.validation.DataError`
naming file, row and field, or -- with ``skip_bad`` -- is skipped and counted in a
:class:`~rematch.data.validation.BadRowReport`.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from rematch.data.images import DecodeCheck
from rematch.data.items import IMAGE_PLACEHOLDER, Item
from rematch.data.records import EvalExample, RowRef, TrainExample
from rematch.data.stores import (
    TABLE_SUFFIXES,
    ArrowDatasetStore,
    RowReadError,
    RowStore,
    open_files_store,
)
from rematch.data.train_source import TrainSource, TrainSubset
from rematch.data.validation import (
    EMPTY_TEXT,
    MISSING_IMAGE,
    ORPHAN_PLACEHOLDER_STRIPPED,
    PLACEHOLDER_MISMATCH,
    SCHEMA,
    UNREADABLE_IMAGE,
    BadRowReport,
    DataError,
    RowProblem,
)

TRAIN_COLUMNS = ("qry", "qry_image_path", "pos_text", "pos_image_path", "neg_text", "neg_image_path")
TRAIN_REQUIRED = TRAIN_COLUMNS[:4]
EVAL_COLUMNS = ("qry_text", "qry_img_path", "tgt_text", "tgt_img_path")
TRAIN, EVAL = "train", "eval"

#: Hugging Face datasets whose split names differ from ours.
HF_SPLIT_ALIASES: dict[str, dict[str, str]] = {"TIGER-Lab/MMEB-train": {"train": "original"}}


_PLACEHOLDER_WITH_SPACE = re.compile(r"(?:<\|image_\d+\|>|<image>)[ \t]*\n?")


# ====================================================================== parsing one row


@dataclass
class ParsedRow:
    """What parsing a row produced: the record, or the problems; plus any repairs made."""

    record: TrainExample | EvalExample | None
    problems: list[RowProblem] = field(default_factory=list)
    repairs: list[str] = field(default_factory=list)


class RowParser:
    """Turns raw rows of one subset into records, checking everything that needs no decoding.

    ``check_files`` looks each image path up on disk (a stat, no decoding), so a missing
    image is reported at read time with its row; ``decode_images`` also decodes each distinct
    file once, so a corrupt one is reported (or skipped) with its row too. ``strip_orphan_placeholders`` repairs a
    known quirk of the published MMEB data (WebQA queries carry ``<|image_1|>`` with no
    image) by removing the placeholder -- counted as a repair -- instead of rejecting the row.
    """

    def __init__(self, subset: str, image_root: str | os.PathLike | None, check_files: bool = True,
                 strip_orphan_placeholders: bool = False, decode_images: bool = False):
        self.subset = subset
        self.decode_check = DecodeCheck() if decode_images and check_files else None
        self.image_root = str(image_root) if image_root is not None else None
        self.check_files = check_files
        self.strip_orphan_placeholders = strip_orphan_placeholders
        self._exists: dict[str, bool] = {}

    # ------------------------------------------------------------------ public

    def train(self, row: Mapping[str, Any] | RowReadError, ref: RowRef) -> ParsedRow:
        result = ParsedRow(None)
        if not self._schema_ok(row, TRAIN_REQUIRED, ref, result):
            return result
        query = self._side(row["qry"], row["qry_image_path"], "qry", "qry_image_path", ref, result)
        positive = self._side(row["pos_text"], row["pos_image_path"], "pos_text", "pos_image_path", ref, result)
        negatives = self._negatives(row.get("neg_text"), row.get("neg_image_path"), ref, result)
        if not result.problems:
            result.record = TrainExample(query=query, positive=positive, negatives=tuple(negatives),
                                         subset=self.subset, ref=ref)
        return result

    def eval(self, row: Mapping[str, Any] | RowReadError, ref: RowRef) -> ParsedRow:
        result = ParsedRow(None)
        if not self._schema_ok(row, EVAL_COLUMNS, ref, result):
            return result
        query = self._side(row["qry_text"], row["qry_img_path"], "qry_text", "qry_img_path", ref, result)
        texts = as_list(row["tgt_text"])
        images = as_list(row["tgt_img_path"])
        for name, values in (("tgt_text", texts), ("tgt_img_path", images)):
            if values is None:
                result.problems.append(RowProblem(SCHEMA, ref, name, f"must be a list, got "
                                                  f"{type(row[name]).__name__}"))
        if result.problems:
            return result
        if len(texts) != len(images):
            result.problems.append(RowProblem(SCHEMA, ref, "tgt_img_path", f"has {len(images)} entries but "
                                              f"tgt_text has {len(texts)}; the lists must align"))
            return result
        if not texts:
            result.problems.append(RowProblem(SCHEMA, ref, "tgt_text", "has no candidates"))
            return result
        candidates = [self._side(text, image, f"tgt_text[{i}]", f"tgt_img_path[{i}]", ref, result)
                      for i, (text, image) in enumerate(zip(texts, images))]
        if not result.problems:
            result.record = EvalExample(query=query, candidates=tuple(candidates), subset=self.subset, ref=ref)
        return result

    # ------------------------------------------------------------------ pieces

    def _schema_ok(self, row, required: Sequence[str], ref: RowRef, result: ParsedRow) -> bool:
        if isinstance(row, RowReadError):
            result.problems.append(RowProblem(SCHEMA, ref, "*", str(row)))
            return False
        missing = [name for name in required if name not in row]
        if missing:
            present = ", ".join(sorted(row)) or "none"
            result.problems.append(RowProblem(SCHEMA, ref, missing[0], f"missing column(s) {missing} "
                                              f"(row has: {present})"))
            return False
        return True

    def _side(self, text: Any, image: Any, text_field: str, image_field: str, ref: RowRef,
              result: ParsedRow) -> Item | None:
        problems = result.problems
        before = len(problems)
        if text is not None and not isinstance(text, str):
            problems.append(RowProblem(SCHEMA, ref, text_field, f"must be a string, got {type(text).__name__}"))
        if image is not None and not isinstance(image, str):
            problems.append(RowProblem(SCHEMA, ref, image_field, f"must be a path string, got "
                                       f"{type(image).__name__}"))
        if len(problems) > before:
            return None
        text = text or ""
        path = self.resolve(image) if image and image.strip() else None
        placeholders = len(IMAGE_PLACEHOLDER.findall(text))
        has_words = bool(IMAGE_PLACEHOLDER.sub("", text).strip())
        if placeholders > 1:
            problems.append(RowProblem(PLACEHOLDER_MISMATCH, ref, text_field,
                                       f"has {placeholders} image placeholders; an item holds one image"))
        elif placeholders == 1 and path is None:
            if self.strip_orphan_placeholders:
                text = _PLACEHOLDER_WITH_SPACE.sub("", text, count=1)
                result.repairs.append(ORPHAN_PLACEHOLDER_STRIPPED)
            else:
                problems.append(RowProblem(PLACEHOLDER_MISMATCH, ref, text_field,
                                           f"has an image placeholder but '{image_field}' is empty "
                                           "(use strip_orphan_placeholders / --strip-orphan-placeholders "
                                           "to drop the placeholder)"))
        elif placeholders == 0 and path is not None and has_words:
            problems.append(RowProblem(PLACEHOLDER_MISMATCH, ref, text_field,
                                       f"'{image_field}' is set but the text has no <|image_1|> placeholder"))
        if path is None and not has_words:
            problems.append(RowProblem(EMPTY_TEXT, ref, text_field, f"is empty and '{image_field}' is empty"))
        if path is not None and self.check_files and not self._file_exists(path):
            root = self.image_root if self.image_root is not None else os.getcwd()
            problems.append(RowProblem(MISSING_IMAGE, ref, image_field,
                                       f"image file not found: {path} ('{image}' resolved against image root "
                                       f"{root})"))
        elif path is not None and self.decode_check is not None:
            reason = self.decode_check.problem(path)
            if reason is not None:
                problems.append(RowProblem(UNREADABLE_IMAGE, ref, image_field, reason))
        if len(problems) > before:
            return None
        return Item(text=text if text.strip() else None, image=path)

    def _negatives(self, texts: Any, images: Any, ref: RowRef, result: ParsedRow) -> list[Item]:
        text_list, image_list = as_list(texts), as_list(images)
        if text_list is None or image_list is None:
            name, value = ("neg_text", texts) if text_list is None else ("neg_image_path", images)
            result.problems.append(RowProblem(SCHEMA, ref, name, f"must be a string or a list, got "
                                              f"{type(value).__name__}"))
            return []
        if text_list and image_list and len(text_list) != len(image_list):
            result.problems.append(RowProblem(SCHEMA, ref, "neg_image_path", f"has {len(image_list)} entries but "
                                              f"neg_text has {len(text_list)}; the lists must align"))
            return []
        count = max(len(text_list), len(image_list))
        text_list = text_list or [None] * count
        image_list = image_list or [None] * count
        listed = isinstance(texts, (list, tuple)) or isinstance(images, (list, tuple))
        negatives = []
        for i, (text, image) in enumerate(zip(text_list, image_list)):
            if not text and not image:  # "" / None in both: no negative in this slot (MMEB's convention)
                continue
            suffix = f"[{i}]" if listed else ""
            item = self._side(text, image, f"neg_text{suffix}", f"neg_image_path{suffix}", ref, result)
            if item is not None:
                negatives.append(item)
        return negatives

    def resolve(self, image: str) -> str:
        return os.path.join(self.image_root, image) if self.image_root is not None else image

    def _file_exists(self, path: str) -> bool:
        known = self._exists.get(path)
        if known is None:
            if len(self._exists) > 200_000:  # bounded memory on huge candidate pools
                self._exists.clear()
            known = self._exists[path] = os.path.isfile(path)
        return known


def as_list(value: Any) -> list | None:
    """None -> [], a string -> [it], a list/tuple -> list; anything else -> None (schema problem)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, (list, tuple)):
        return list(value)
    if hasattr(value, "tolist"):  # numpy arrays from some parquet readers
        converted = value.tolist()
        return converted if isinstance(converted, list) else None
    return None


# ====================================================================== finding subsets


@dataclass
class SubsetSource:
    """One subset of one split, not yet opened: where its rows are and how to read them."""

    name: str
    split: str
    location: str  # a file, a directory of shards, or "dataset_id/subset"
    image_root: str | None
    opener: Any = field(repr=False, default=None)  # (limit, columns) -> RowStore

    def open(self, limit: int | None = None, columns: Sequence[str] | None = None) -> RowStore:
        return self.opener(limit, columns)


def is_local(source: str | os.PathLike) -> bool:
    return Path(source).exists()


def _looks_like_hub_id(source: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", source)) and not source.startswith((".", "/"))


def split_layout(subset_dir: Path, split: str) -> tuple[str, list[Path]] | None:
    """("files", paths) or ("arrow", [dir]) holding ``split`` of one subset directory; None if absent."""
    arrow_dir = subset_dir / split
    if arrow_dir.is_dir() and ((arrow_dir / "state.json").is_file() or (arrow_dir / "dataset_info.json").is_file()):
        return "arrow", [arrow_dir]
    found: dict[str, list[Path]] = {}
    for suffix in TABLE_SUFFIXES:
        exact = subset_dir / f"{split}{suffix}"
        shards = sorted(p for p in subset_dir.glob(f"{glob.escape(split)}-*{suffix}")
                        if re.fullmatch(rf"{re.escape(split)}-\d+-of-\d+", p.stem))
        paths = ([exact] if exact.is_file() else []) + shards
        if paths:
            found[suffix] = paths
    if not found:
        return None
    if len(found) > 1:
        listed = ", ".join(str(p) for paths in found.values() for p in paths)
        raise DataError(f"{subset_dir}: split '{split}' exists in several formats ({listed}); keep one")
    return "files", next(iter(found.values()))


def local_subset(name: str, split: str, layout: tuple[str, list[Path]], image_root: str | None) -> SubsetSource:
    kind, paths = layout
    location = str(paths[0]) if len(paths) == 1 else str(paths[0].parent / f"{split}-*")
    if kind == "arrow":
        def open_arrow(limit, columns, path=paths[0]):
            import datasets

            return ArrowDatasetStore(datasets.load_from_disk(str(path)), source=str(path), columns=columns,
                                     limit=limit)

        return SubsetSource(name, split, location, image_root, open_arrow)

    def open_files(limit, columns, files=tuple(paths)):
        return open_files_store(list(files), source=location, columns=columns, limit=limit)

    return SubsetSource(name, split, location, image_root, open_files)


def _hub_subset(dataset_id: str, name: str, split: str, image_root: str | None) -> SubsetSource:
    hub_split = HF_SPLIT_ALIASES.get(dataset_id, {}).get(split, split)

    def open_hub(limit, columns):
        import datasets

        dataset = datasets.load_dataset(dataset_id, name, split=hub_split)  # Arrow, memory-mapped
        return ArrowDatasetStore(dataset, source=f"{dataset_id}/{name}/{hub_split}", columns=columns, limit=limit)

    return SubsetSource(name, split, f"{dataset_id}/{name}", image_root, open_hub)


def list_subsets(source: str | os.PathLike, split: str) -> list[str]:
    """Subsets that have ``split``: under a local ROOT (``<Subset>/<split>.*``), a file's stem,
    or a Hugging Face dataset's config names (online)."""
    path = Path(source)
    if path.is_file():
        return [path.stem]
    if path.is_dir():
        return sorted(child.name for child in path.iterdir()
                      if child.is_dir() and split_layout(child, split) is not None)
    if _looks_like_hub_id(str(source)):
        import datasets

        return sorted(datasets.get_dataset_config_names(str(source)))
    raise DataError(f"{source}: no such file or directory (and not a Hugging Face dataset id)")


def list_splits(subset_dir: str | os.PathLike) -> list[str]:
    """Split names present in one local subset directory (``train``, ``test``, ``original`` ...)."""
    names = set()
    for child in Path(subset_dir).iterdir():
        if child.is_file() and child.suffix.lower() in TABLE_SUFFIXES:
            names.add(re.sub(r"-\d+-of-\d+$", "", child.stem))
        elif child.is_dir() and ((child / "state.json").is_file() or (child / "dataset_info.json").is_file()):
            names.add(child.name)
    return sorted(names)


def find_subsets(source: str | os.PathLike, split: str, subsets: Sequence[str] | None = None,
                 image_root: str | os.PathLike | None = None) -> list[SubsetSource]:
    """The subsets of one source (ROOT dir, file, or hub id), filtered by name, not yet opened.

    Image roots default to ROOT (for a directory), the file's directory (for a file), and
    the current directory (for a hub id, whose images are never part of the download).
    """
    root_given = str(image_root) if image_root is not None else None
    path = Path(source)
    if path.is_file():
        if path.suffix.lower() not in TABLE_SUFFIXES:
            raise DataError(f"{path}: unsupported file type; expected one of {', '.join(TABLE_SUFFIXES)}")
        found = [local_subset(path.stem, split, ("files", [path]), root_given or str(path.parent))]
    elif path.is_dir():
        names = list_subsets(path, split)
        found = [local_subset(name, split, split_layout(path / name, split), root_given or str(path))
                 for name in names]
        if not found and subsets is None:
            raise DataError(f"{path}: no subset has a '{split}' split (expected {path}/<Subset>/{split}.jsonl, "
                            f".parquet or .csv)")
    elif _looks_like_hub_id(str(source)):
        names = list(subsets) if subsets is not None else list_subsets(source, split)
        return [_hub_subset(str(source), name, split, root_given) for name in names]
    else:
        raise DataError(f"{source}: no such file or directory (and not a Hugging Face dataset id)")
    if subsets is not None:
        by_name = {s.name: s for s in found}
        missing = [name for name in subsets if name not in by_name]
        if missing:
            raise DataError(f"{source}: subset(s) {missing} have no '{split}' split here; available: "
                            f"{sorted(by_name)}")
        found = [by_name[name] for name in subsets]
    return found


# ====================================================================== evaluation


def iter_eval_examples(source: str, subset: str, image_root: str | None = None, skip_bad: bool = False,
                       report: BadRowReport | None = None, split: str = "test",
                       strip_orphan_placeholders: bool = False,
                       decode_images: bool | None = None) -> Iterator[EvalExample]:
    """Stream the evaluation queries of one subset (MMEB-eval schema), validated row by row.

    ``source`` is a local ROOT (``ROOT/<subset>/test.jsonl|parquet``), a single file, or a
    Hugging Face dataset id (``TIGER-Lab/MMEB-eval``). Bad rows raise :class:`DataError`,
    or are skipped and counted in ``report`` when ``skip_bad``. ``decode_images`` (default:
    ``skip_bad``) decodes every distinct image once while reading, so a corrupt file is
    skipped with its row rather than failing the evaluation later; without it a corrupt
    file is found at encoding time (and :mod:`rematch.evaluation.mmeb` names its row).
    """
    report = report if report is not None else BadRowReport()
    (found,) = find_subsets(source, split, [subset] if not Path(source).is_file() else None, image_root)
    parser = RowParser(subset, found.image_root, strip_orphan_placeholders=strip_orphan_placeholders,
                       decode_images=skip_bad if decode_images is None else decode_images)
    yield from _parsed_records(found.open(columns=EVAL_COLUMNS), parser.eval, report, skip_bad)


def _parsed_records(store: RowStore, parse, report: BadRowReport, skip_bad: bool) -> Iterator:
    """Every row of ``store`` parsed in file order; bad rows raise or are skipped and counted."""
    try:
        for index, row in store.iter_rows():
            parsed = parse(row, store.ref(index))
            if parsed.problems:
                report.handle(parsed.problems[0], skip_bad)
                continue
            for repair in parsed.repairs:
                report.record_repair(repair, parsed.record.ref)
            yield parsed.record
    finally:
        store.close()


def read_eval_examples(source: str, subset: str, **kwargs) -> list[EvalExample]:
    """All evaluation queries of a subset as a list (they are few: ~1000 per MMEB subset)."""
    return list(iter_eval_examples(source, subset, **kwargs))


# ====================================================================== training


def iter_train_examples(source: str, subset: str | None = None, split: str = "train", image_root: str | None = None,
                        skip_bad: bool = False, report: BadRowReport | None = None,
                        strip_orphan_placeholders: bool = False) -> Iterator[TrainExample]:
    """Stream one subset's training pairs in file order (no shuffling; see :func:`open_train_source`)."""
    report = report if report is not None else BadRowReport()
    (found,) = find_subsets(source, split, [subset] if subset is not None else None, image_root)
    parser = RowParser(found.name, found.image_root, strip_orphan_placeholders=strip_orphan_placeholders)
    yield from _parsed_records(found.open(columns=TRAIN_COLUMNS), parser.train, report, skip_bad)


def open_train_source(source: str | Sequence[str], subsets: Sequence[str] | None = None, split: str = "train",
                      image_root: str | None = None, caps: Mapping[str, int] | None = None,
                      weights: Mapping[str, float] | None = None, seed: int = 0, skip_bad: bool = False, *,
                      strip_orphan_placeholders: bool = False, window_blocks: int = 4, rank: int = 0,
                      world_size: int = 1, report: BadRowReport | None = None,
                      subset_run: int = 1) -> TrainSource:
    """An endless, shuffled, resumable stream of training pairs over one or more sources.

    ``caps`` keep the first N rows of a subset (as VLM2Vec's ``num_sample_per_subset``);
    ``weights`` are relative sampling probabilities per subset (every subset must be listed;
    0 leaves one out); without weights each subset is drawn in proportion to its (capped)
    size, i.e. every row about once per pass. See :class:`rematch.data.train_source.TrainSource`.
    """
    sources = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    found: list[SubsetSource] = []
    hub_sources = []
    for one in sources:
        if not is_local(one):
            hub_sources.append(str(one))
            continue
        wanted = None
        if subsets is not None:  # each local source contributes the requested subsets it has
            available = set(list_subsets(one, split))
            wanted = [name for name in subsets if name in available]
            if not wanted:
                continue
        found.extend(find_subsets(one, split, wanted, image_root))
    for one in hub_sources:  # a hub id supplies the requested subsets no local source had
        wanted = None if subsets is None else [name for name in subsets if name not in {s.name for s in found}]
        if wanted != []:
            found.extend(find_subsets(one, split, wanted, image_root))
    names = [s.name for s in found]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise DataError(f"subset name(s) {duplicates} appear in more than one source; rename one")
    if subsets is not None:
        missing = [name for name in subsets if name not in names]
        if missing:
            raise DataError(f"subset(s) {missing} not found with a '{split}' split in {sources}")
    if not found:
        raise DataError(f"no training subsets found in {sources}")
    caps = dict(caps or {})
    unknown = sorted(set(caps) - set(names))
    if unknown:
        raise DataError(f"caps name unknown subset(s) {unknown}; subsets: {names}")
    members = []
    for sub in found:
        cap = caps.get(sub.name)
        if cap is not None and cap < 0:
            raise DataError(f"cap for {sub.name} must be >= 0, got {cap}")
        store = sub.open(limit=cap, columns=TRAIN_COLUMNS)
        _check_train_columns(sub, store)
        parser = RowParser(sub.name, sub.image_root, strip_orphan_placeholders=strip_orphan_placeholders)
        members.append(TrainSubset(sub.name, store, parser))
    return TrainSource(members, weights=weights, seed=seed, skip_bad=skip_bad, report=report,
                       window_blocks=window_blocks, rank=rank, world_size=world_size, subset_run=subset_run)


def _check_train_columns(sub: SubsetSource, store: RowStore) -> None:
    """A file that lacks a required column is wrong as a whole: fail before training starts."""
    columns = getattr(store, "all_columns", None)
    if columns is None:
        return  # jsonl / csv: checked row by row
    missing = [name for name in TRAIN_REQUIRED if name not in columns]
    if missing:
        hint = " (this looks like an MMEB-eval file)" if "qry_text" in columns else ""
        raise DataError(f"{sub.location}: missing column(s) {missing} of the MMEB-train schema{hint}; "
                        f"columns: {columns}")


__all__ = ["EVAL_COLUMNS", "HF_SPLIT_ALIASES", "ParsedRow", "RowParser", "SubsetSource", "TRAIN_COLUMNS",
           "find_subsets", "iter_eval_examples", "iter_train_examples", "list_splits", "list_subsets",
           "open_train_source", "read_eval_examples"]
