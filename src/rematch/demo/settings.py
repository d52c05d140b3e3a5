"""What the demo runs: its sizes (default and --quick) and the ablation rows.

The rows follow the paper's ablation (METHOD.md section 6), each adding one ingredient to
the previous one; every row trains with the same data, steps, batch, learning rate and
seeds, so differences come from the method alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

SUBSETS = ("ShapesCLS", "ShapesVQA", "ShapesT2I", "ShapesI2T", "ShapesGround")
COMPOSITIONAL = ("ShapesT2I", "ShapesI2T")


@dataclass(frozen=True)
class AblationRow:
    name: str
    label: str
    overrides: dict
    uses_matching: bool


def _cumulative_rows() -> tuple[AblationRow, ...]:
    """Each row is the previous row plus one ingredient, as in the paper's ablation."""
    steps = [
        ("baseline", "VLM2Vec-style baseline (K=0, last token, contrastive)",
         {"model.num_tokens": 0, "model.pooling": "last", "loss.orthogonality": 0.0, "loss.matching": 0.0,
          "loss.hard_negatives": False, "model.document_instructions": False}),
        ("target_instruction", "+ target instruction", {"model.document_instructions": True}),
        ("hard_negative", "+ hard negative", {"loss.hard_negatives": True}),
        ("matching", "+ matching (MVQDM)", {"loss.matching": 0.1}),
        ("multi_token", "+ multi-token fusion (MEF, K=16)", {"model.num_tokens": 16, "model.pooling": "mean"}),
        ("full", "full ReMatch (+ orthogonality)", {"loss.orthogonality": 0.5}),
    ]
    rows, overrides = [], {}
    for name, label, change in steps:
        overrides = {**overrides, **change}
        rows.append(AblationRow(name, label, overrides, uses_matching=overrides["loss.matching"] > 0))
    return tuple(rows)


ROWS: tuple[AblationRow, ...] = _cumulative_rows()


@dataclass
class DemoSettings:
    """Sizes of one demo run. ``quick`` shrinks everything to a smoke run of about two minutes."""

    out: Path = Path("runs/demo")
    seeds: int = 1
    quick: bool = False
    train_rows: int = 2000
    eval_queries: int = 40
    eval_candidates: int = 50
    steps: int = 300
    batch_size: int = 16
    lr: float = 3e-4
    temperature: float = 0.02
    image_size: int = 56
    rerank_top: int = 5
    rows: tuple[str, ...] = field(default_factory=lambda: tuple(row.name for row in ROWS))

    @classmethod
    def create(cls, out: str | Path = "runs/demo", quick: bool = False, seeds: int = 1, **overrides) -> "DemoSettings":
        settings = cls(out=Path(out), quick=quick, seeds=seeds)
        if quick:
            settings.train_rows, settings.eval_queries, settings.eval_candidates = 200, 10, 20
            settings.steps, settings.batch_size, settings.rerank_top = 12, 8, 3
        for key, value in overrides.items():
            if value is not None:
                setattr(settings, key, value)
        if settings.seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {settings.seeds}")
        unknown = set(settings.rows) - {row.name for row in ROWS}
        if unknown:
            raise ValueError(f"unknown ablation rows {sorted(unknown)}; known: {[row.name for row in ROWS]}")
        return settings

    def selected_rows(self) -> list[AblationRow]:
        return [row for row in ROWS if row.name in self.rows]
