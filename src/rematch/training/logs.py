"""Per-step loss logs (JSONL + CSV, TensorBoard when installed) and the loss-curve plot."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Sequence

LOSS_TERMS = ("loss", "contrastive", "orthogonality", "matching")


class StepLog:
    """Appends one row per step to ``<name>.jsonl`` and ``<name>.csv`` in ``out`` (``losses``
    by default; pre-training also keeps ``heldout`` for its accuracy during the run).

    On resume, rows after the resumed step are dropped first, so the curve continues
    without duplicates.
    """

    def __init__(self, out: Path, resume_step: int = 0, tensorboard: bool = True, name: str = "losses"):
        self.jsonl = out / f"{name}.jsonl"
        self.csv = out / f"{name}.csv"
        out.mkdir(parents=True, exist_ok=True)
        rows = [row for row in read_log(self.jsonl) if row["step"] <= resume_step] if resume_step else []
        self.rows: list[dict[str, Any]] = rows
        with open(self.jsonl, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
        self._rewrite_csv()
        self.writer = _tensorboard_writer(out / "tensorboard") if tensorboard else None

    def append(self, row: dict[str, Any]) -> None:
        new_columns = set(row) - set(self.rows[0]) if self.rows else set()
        self.rows.append(row)
        with open(self.jsonl, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
        if new_columns or len(self.rows) == 1:
            self._rewrite_csv()
        else:
            with open(self.csv, "a", newline="", encoding="utf-8") as handle:
                csv.DictWriter(handle, fieldnames=self._columns()).writerow(row)
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"train/{key}", value, row["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def _columns(self) -> list[str]:
        columns: list[str] = []
        for row in self.rows:
            columns += [key for key in row if key not in columns]
        return columns

    def _rewrite_csv(self) -> None:
        with open(self.csv, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=self._columns())
            writer.writeheader()
            writer.writerows(self.rows)


def read_log(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _tensorboard_writer(directory: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(directory))


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (NaN-free input assumed)."""
    out, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        out.append(total / min(index + 1, window))
    return out


#: A panel of the loss plot: one step-log column (its name is the title), or a title and the
#: columns drawn together in it (the matching loss of each kind of view pair).
Panel = str | tuple[str, Sequence[str]]


def plot_losses(rows: list[dict[str, Any]], path: Path, title: str = "training losses",
                terms: Sequence[Panel] = LOSS_TERMS) -> Path:
    """One panel per entry of ``terms`` that the rows have: raw values faint, moving average
    solid; a panel of several columns draws each in its own colour, with a legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(panel, (panel,)) if isinstance(panel, str) else (panel[0], tuple(panel[1])) for panel in terms]
    panels = [(name, columns) for name, columns in panels if any(c in row for row in rows for c in columns)]
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    window = max(1, len(rows) // 20)
    for axis, (name, columns) in zip(axes[0], panels):
        for column in columns:
            points = [(row["step"], row[column]) for row in rows if column in row and math.isfinite(row[column])]
            if not points:
                continue
            steps, values = [p[0] for p in points], [p[1] for p in points]
            label = column.rpartition("/")[2] if len(columns) > 1 else None
            raw = axis.plot(steps, values, alpha=0.3, linewidth=0.8)[0]
            axis.plot(steps, smooth(values, window), linewidth=1.8, color=raw.get_color(), label=label)
        if len(columns) > 1:
            axis.legend(fontsize=7)
        axis.set_title(name)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
