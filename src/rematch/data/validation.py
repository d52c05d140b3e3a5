"""Bad rows: what is wrong with them, the error that stops a run, the report that counts them.

A data problem must never vanish. Either it stops the run with a :class:`DataError` that
names the file, the row and the field, or -- when the user asked for ``--skip-bad`` -- the
row is skipped and counted in a :class:`BadRowReport`, whose summary is printed at the end.
The same report travels from the readers (missing files, empty texts, schema, placeholders)
to the collator (unreadable images, only discovered when an image is opened).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from rematch.data.records import RowRef

MISSING_IMAGE = "missing image"
UNREADABLE_IMAGE = "unreadable image"
EMPTY_TEXT = "empty text"
SCHEMA = "schema"
PLACEHOLDER_MISMATCH = "placeholder mismatch"

#: Every reason a row can be bad, in the order reports list them.
REASONS = (MISSING_IMAGE, UNREADABLE_IMAGE, EMPTY_TEXT, SCHEMA, PLACEHOLDER_MISMATCH)

#: A repair that changes a row instead of rejecting it (only on request, always counted).
ORPHAN_PLACEHOLDER_STRIPPED = "orphan placeholder stripped"


@dataclass(frozen=True)
class RowProblem:
    """One thing wrong with one row: why, where (row and field) and the details."""

    reason: str
    ref: RowRef
    field: str
    detail: str

    def __str__(self) -> str:
        return f"{self.ref}: field '{self.field}': {self.detail}"


class DataError(ValueError):
    """A bad data row; the message names the file (or dataset), the row and the field."""

    def __init__(self, problem: RowProblem | str):
        self.problem = problem if isinstance(problem, RowProblem) else None
        super().__init__(str(problem) + (" (pass --skip-bad / skip_bad=True to skip and count bad rows)"
                                         if self.problem is not None else ""))


class BadRowReport:
    """Counts of bad rows per reason, with the first few offenders of each, and repairs.

    ``record`` is called once per *skipped* row (with the problem that condemned it), so
    the counts add up to the rows a run did not use. ``data check`` records every problem
    it finds instead (a row can then count under several reasons). Recording is
    thread-safe: collation often runs in worker threads while the reader keeps counting.
    """

    def __init__(self, max_examples: int = 5):
        self._lock = threading.Lock()
        self.max_examples = max_examples
        self.counts: dict[str, int] = {reason: 0 for reason in REASONS}
        self.examples: dict[str, list[RowProblem]] = {reason: [] for reason in REASONS}
        self.repairs: dict[str, int] = {}
        self.repair_examples: dict[str, list[RowRef]] = {}

    # ------------------------------------------------------------------ recording

    def record(self, problem: RowProblem) -> None:
        with self._lock:
            self.counts[problem.reason] = self.counts.get(problem.reason, 0) + 1
            shown = self.examples.setdefault(problem.reason, [])
            if len(shown) < self.max_examples:
                shown.append(problem)

    def record_repair(self, kind: str, ref: RowRef) -> None:
        with self._lock:
            self.repairs[kind] = self.repairs.get(kind, 0) + 1
            shown = self.repair_examples.setdefault(kind, [])
            if len(shown) < self.max_examples:
                shown.append(ref)

    def handle(self, problem: RowProblem, skip_bad: bool) -> None:
        """The one policy: raise a :class:`DataError`, or count the row as skipped."""
        if not skip_bad:
            raise DataError(problem)
        self.record(problem)

    def merge(self, other: "BadRowReport") -> None:
        with self._lock:
            self._merge(other)

    def _merge(self, other: "BadRowReport") -> None:
        for reason, count in other.counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + count
            shown = self.examples.setdefault(reason, [])
            shown.extend(other.examples.get(reason, [])[: max(0, self.max_examples - len(shown))])
        for kind, count in other.repairs.items():
            self.repairs[kind] = self.repairs.get(kind, 0) + count
            shown = self.repair_examples.setdefault(kind, [])
            shown.extend(other.repair_examples.get(kind, [])[: max(0, self.max_examples - len(shown))])

    # ------------------------------------------------------------------ reading

    @property
    def total(self) -> int:
        """Bad rows (or problems, for ``data check``) recorded, all reasons together."""
        return sum(self.counts.values())

    def __bool__(self) -> bool:
        return self.total > 0 or bool(self.repairs)

    def summary(self) -> str:
        """A few lines for the end of a run: counts per reason and the first offenders."""
        with self._lock:
            return self._summary()

    def _summary(self) -> str:
        if not self:
            return "no bad rows"
        lines = [f"{self.total} bad row(s) skipped" if self.total else "no bad rows"]
        for reason in sorted(self.counts, key=_reason_order):
            count = self.counts[reason]
            if not count:
                continue
            lines.append(f"  {reason}: {count}")
            lines.extend(f"    {problem}" for problem in self.examples.get(reason, []))
        for kind, count in sorted(self.repairs.items()):
            lines.append(f"  repaired ({kind}): {count}")
            lines.extend(f"    {ref}" for ref in self.repair_examples.get(kind, []))
        return "\n".join(lines)

    # ------------------------------------------------------------------ persistence (resume)

    def __getstate__(self):  # picklable (DataLoader workers): the lock is recreated
        state = dict(self.__dict__)
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable, so a training checkpoint can carry the counts across a resume."""
        with self._lock:
            return self._to_dict()

    def _to_dict(self) -> dict[str, Any]:
        return {
            "max_examples": self.max_examples,
            "counts": dict(self.counts),
            "examples": {reason: [_problem_to_dict(p) for p in problems]
                         for reason, problems in self.examples.items() if problems},
            "repairs": dict(self.repairs),
            "repair_examples": {kind: [[r.source, r.row] for r in refs] for kind, refs in self.repair_examples.items()},
        }

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> "BadRowReport":
        report = cls(max_examples=int(state.get("max_examples", 5)))
        report.load_dict(state)
        return report

    def load_dict(self, state: Mapping[str, Any]) -> None:
        with self._lock:
            self._load_dict(state)

    def _load_dict(self, state: Mapping[str, Any]) -> None:
        self.counts = {reason: 0 for reason in REASONS}
        self.counts.update({k: int(v) for k, v in state.get("counts", {}).items()})
        self.examples = {reason: [] for reason in REASONS}
        for reason, problems in state.get("examples", {}).items():
            self.examples[reason] = [_problem_from_dict(p) for p in problems]
        self.repairs = {k: int(v) for k, v in state.get("repairs", {}).items()}
        self.repair_examples = {kind: [RowRef(source, int(row)) for source, row in refs]
                                for kind, refs in state.get("repair_examples", {}).items()}


def _reason_order(reason: str) -> int:
    return REASONS.index(reason) if reason in REASONS else len(REASONS)


def _problem_to_dict(problem: RowProblem) -> dict[str, Any]:
    return {"reason": problem.reason, "source": problem.ref.source, "row": problem.ref.row,
            "field": problem.field, "detail": problem.detail}


def _problem_from_dict(data: Mapping[str, Any]) -> RowProblem:
    return RowProblem(data["reason"], RowRef(data["source"], int(data["row"])), data["field"], data["detail"])


def first_problem(problems: Iterable[RowProblem]) -> RowProblem | None:
    for problem in problems:
        return problem
    return None
