"""``rematch data check``: validate an MMEB-layout dataset before a run finds its bad rows.

For every subset and split under ROOT it streams the rows once, applies exactly the
checks training and evaluation apply (schema, empty texts, placeholder/image agreement,
missing image files) and additionally *decodes* every distinct image, which is the only
way to find unreadable ones. Each subset gets its own :class:`BadRowReport`, so the table
shows counts per reason and the first offending rows with file, row and field.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from rematch.data.images import DecodeCheck
from rematch.data.mmeb import EVAL, TRAIN, RowParser, SubsetSource, as_list, list_splits, local_subset, split_layout
from rematch.data.records import RowRef
from rematch.data.stores import RowReadError
from rematch.data.validation import REASONS, SCHEMA, UNREADABLE_IMAGE, BadRowReport, RowProblem

#: JPEGs decode at a reduced scale for the check (corruption still shows; it is much faster).


@dataclass
class SubsetCheck:
    """The outcome for one subset and split."""

    subset: str
    split: str
    schema: str  # "train", "eval" or "?" (neither schema's columns)
    location: str
    rows: int
    bad_rows: int
    report: BadRowReport
    error: str | None = None
    """Why the subset's file could not be read (to the end), if it could not."""

    @property
    def ok(self) -> bool:
        return self.bad_rows == 0 and self.error is None


def _subsets(root: Path, split: str, image_root: str | None) -> Iterator[SubsetSource]:
    if root.is_file():
        yield local_subset(root.stem, split, ("files", [root]), image_root or str(root.parent))
        return
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such file or directory")
    for child in sorted(p for p in root.iterdir() if p.is_dir()):
        splits = list_splits(child) if split == "all" else [split]
        for name in splits:
            layout = split_layout(child, name)
            if layout is not None:
                yield local_subset(child.name, name, layout, image_root or str(root))


def _image_fields(row: Mapping[str, Any], schema: str) -> Iterator[tuple[str, str]]:
    """(field name, relative path) of every image a raw row refers to."""
    if schema == TRAIN:
        names = [("qry_image_path", row.get("qry_image_path")), ("pos_image_path", row.get("pos_image_path"))]
        negatives = as_list(row.get("neg_image_path")) or []
        listed = isinstance(row.get("neg_image_path"), (list, tuple))
        names += [(f"neg_image_path[{i}]" if listed else "neg_image_path", p) for i, p in enumerate(negatives)]
    else:
        names = [("qry_img_path", row.get("qry_img_path"))]
        names += [(f"tgt_img_path[{i}]", p) for i, p in enumerate(as_list(row.get("tgt_img_path")) or [])]
    for name, value in names:
        if isinstance(value, str) and value.strip():
            yield name, value


def check_subset(source: SubsetSource, decode_images: bool = True, strip_orphan_placeholders: bool = False,
                 max_examples: int = 3) -> SubsetCheck:
    """Stream one subset/split and record every problem of every row."""
    report = BadRowReport(max_examples=max_examples)
    store = source.open()
    columns = getattr(store, "all_columns", None)
    if columns is None:  # jsonl: the first row tells
        columns = next((list(row) for _, row in store.iter_rows() if isinstance(row, dict)), [])
    schema = TRAIN if "qry" in columns else EVAL if "qry_text" in columns else "?"
    parser = RowParser(source.name, source.image_root, strip_orphan_placeholders=strip_orphan_placeholders)
    decoded = DecodeCheck()
    rows = bad_rows = 0
    error = None
    try:
        for index, row in store.iter_rows():
            rows += 1
            ref = store.ref(index)
            if schema == "?":
                report.record(RowProblem(SCHEMA, ref, "*", f"columns {sorted(columns)} match neither the MMEB-train "
                                         "(qry, qry_image_path, pos_text, pos_image_path) nor the MMEB-eval "
                                         "(qry_text, qry_img_path, tgt_text, tgt_img_path) schema"))
                bad_rows += 1
                continue
            parsed = parser.train(row, ref) if schema == TRAIN else parser.eval(row, ref)
            problems = list(parsed.problems)
            if decode_images and not isinstance(row, RowReadError):
                problems += _unreadable(row, schema, parser, ref, decoded)
            for problem in problems:
                report.record(problem)
            for repair in parsed.repairs:
                report.record_repair(repair, ref)
            bad_rows += bool(problems)
    except _UNREADABLE_FILE as failure:  # the rest of this file cannot be read: say so, check the others
        error = f"cannot read {source.location} after {rows} row(s): {type(failure).__name__}: {failure}"
    finally:
        store.close()
    return SubsetCheck(source.name, source.split, schema, source.location, rows, bad_rows, report, error)


def _unreadable_file_errors() -> tuple[type[BaseException], ...]:
    import pyarrow

    return (OSError, ValueError, pyarrow.ArrowException)


_UNREADABLE_FILE = _unreadable_file_errors()


def _check_or_report(source: SubsetSource, **options) -> SubsetCheck:
    """``check_subset``, or a failed check naming the file when it cannot even be opened."""
    try:
        return check_subset(source, **options)
    except _UNREADABLE_FILE as failure:
        return SubsetCheck(source.name, source.split, "?", source.location, 0, 0, BadRowReport(),
                           f"cannot read {source.location}: {type(failure).__name__}: {failure}")


def _unreadable(row, schema, parser: RowParser, ref: RowRef, decoded: DecodeCheck) -> list[RowProblem]:
    problems = []
    for name, relative in _image_fields(row, schema):
        path = parser.resolve(relative)
        if not os.path.isfile(path):
            continue  # reported as missing by the parser
        reason = decoded.problem(path)
        if reason is not None:
            problems.append(RowProblem(UNREADABLE_IMAGE, ref, name, reason))
    return problems


def check_dataset(root: str | os.PathLike, image_root: str | os.PathLike | None = None, split: str = "all",
                  decode_images: bool = True, strip_orphan_placeholders: bool = False,
                  max_examples: int = 3) -> list[SubsetCheck]:
    """Check every subset (and split: ``train``, ``test``, ... or ``all``) under ``root``."""
    root = Path(root)
    results = [_check_or_report(source, decode_images=decode_images,
                                 strip_orphan_placeholders=strip_orphan_placeholders, max_examples=max_examples)
               for source in _subsets(root, split, str(image_root) if image_root is not None else None)]
    if not results:
        wanted = "<split>" if split == "all" else split
        raise FileNotFoundError(f"{root}: no subsets found{'' if split == 'all' else f' for split {split!r}'} "
                                f"(expected {root}/<Subset>/{wanted}.jsonl, .parquet or .csv)")
    return results


COLUMN_TITLES = {"missing image": "missing img", "unreadable image": "unreadable img", "empty text": "empty text",
                 "schema": "schema", "placeholder mismatch": "placeholder"}


def format_check(results: list[SubsetCheck]) -> str:
    """The per-subset table, then the first offending rows of each problem, then a verdict."""
    header = ["subset", "split", "schema", "rows", "bad rows"] + [COLUMN_TITLES[r] for r in REASONS]
    table = [[r.subset, r.split, r.schema, str(r.rows), str(r.bad_rows)] + [str(r.report.counts.get(reason, 0))
                                                                            for reason in REASONS]
             for r in results]
    widths = [max(len(row[i]) for row in [header] + table) for i in range(len(header))]

    def line(cells):
        return "  ".join(cell.ljust(w) if i < 3 else cell.rjust(w) for i, (cell, w) in enumerate(zip(cells, widths)))

    lines = [line(header)] + [line(row) for row in table]
    details = []
    for result in results:
        if result.error:
            details.append(f"{result.subset}/{result.split}: UNREADABLE: {result.error}")
        for reason in REASONS:
            shown = result.report.examples.get(reason, [])
            if shown:
                details.append(f"{result.subset}/{result.split}: {reason} ({result.report.counts[reason]}), first:")
                details.extend(f"  {problem}" for problem in shown)
        for kind, count in result.report.repairs.items():
            details.append(f"{result.subset}/{result.split}: repaired ({kind}): {count}")
    if details:
        lines += [""] + details
    bad = sum(r.bad_rows for r in results)
    total = sum(r.rows for r in results)
    unreadable = sum(r.error is not None for r in results)
    lines += ["", f"{bad} bad row(s) in {total} rows of {len(results)} subset split(s)"
              + (f"; {unreadable} file(s) could not be read" if unreadable else "")
              + ("" if bad or unreadable else ": all good")]
    return "\n".join(lines)
