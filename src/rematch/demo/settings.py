"""What the demo runs: its sizes (default and --quick) and the ablation rows.

The rows follow the paper's ablation (METHOD.md section 6), each adding one ingredient to
the previous one; every row trains with the same data, steps, batch, learning rate and
seeds, so differences come from the method alone. The paper fine-tunes a pretrained MLLM;
the demo does the same in miniature: every row starts from the shipped generatively
pretrained tiny backbone (``tiny-pretrained``, docs/pretraining.md), and ``--from-scratch``
adds the full recipe from a random backbone as a row of its own, which shows what the
pre-training buys (measured 2026-11-27 at 40 queries per subset: full ReMatch 30.5% overall
hit@1 from the pretrained start, 21.5% from the random one; README, "The demo").
``--backbone tiny`` runs every row from the random backbone instead.
"""

from __future__ import annotations

import os
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

    @property
    def cost(self) -> float:
        """Relative training time of the row, from what it adds to a step (measured on the
        pretrained start, README "The demo": 60 s baseline, 80 s with a hard negative, 116 s
        with matching, 148 s full): a hard negative is one more encoder pass, matching adds
        the generative passes, K tokens lengthen every sequence. Used to hand the heaviest
        rows to the demo's workers first."""
        overrides = self.overrides
        return (1.0 + 0.3 * bool(overrides.get("loss.hard_negatives"))
                + 0.6 * (overrides.get("loss.matching", 0) > 0) + 0.3 * (overrides.get("model.num_tokens", 0) > 0)
                + 0.1 * (overrides.get("loss.orthogonality", 0) > 0))


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

#: The random backbone (its vision tower trains in every row; a pretrained tower stays frozen).
RANDOM_BACKBONE = "tiny"
#: The full recipe from a random tiny backbone instead of the pretrained one (``--from-scratch``).
FROM_SCRATCH = AblationRow("from_scratch", "full ReMatch, random start (no pre-training)",
                           {**ROWS[-1].overrides, "model.backbone": RANDOM_BACKBONE, "train.freeze_vision": False},
                           uses_matching=True)
ALL_ROWS: tuple[AblationRow, ...] = (*ROWS, FROM_SCRATCH)

#: Backbones the demo can start from.
#: The most training steps per demo row (the default is 300: beyond this the demo would run for days).
DEMO_MAX_STEPS = 100_000

BACKBONES = ("tiny", "tiny-pretrained")
#: Image side of the random start (the demo's size before pre-training existed).
RANDOM_START_IMAGE_SIZE = 56


def backbone_image_size(backbone: str) -> int:
    """The image side a demo backbone is used at: the pretrained one at the size it was
    pre-trained at (read from its record; at 56 px a shape covers ~5% of one visual token)."""
    if backbone == "tiny-pretrained":
        from rematch.backbones.pretrained_tiny import read_record

        return int(read_record()["image_size"])
    return RANDOM_START_IMAGE_SIZE


@dataclass
class DemoSettings:
    """Sizes of one demo run. ``quick`` shrinks everything to a smoke run of about two minutes."""

    out: Path = Path("runs/demo")
    seeds: int = 1
    quick: bool = False
    train_rows: int = 2000
    eval_queries: int = 100
    """Queries per evaluation subset: at 100 one query moves hit@1 by at most 1 point (at the
    earlier 40, by 2.5, about the size of the differences the ablation looks for)."""
    eval_candidates: int = 50
    steps: int = 300
    batch_size: int = 16
    lr: float = 3e-4
    temperature: float = 0.02
    image_size: int | None = None
    """Image side the model sees; None: the backbone's own (:func:`backbone_image_size`)."""
    rerank_top: int = 5
    video_clips: int = 4
    """Moving-shapes clips per video task (and split) the full model is scored on (0: none)."""
    pages: int = 8
    """Rendered text pages (with one query each) the full model is scored on (0: none)."""
    backbone: str = "tiny-pretrained"
    from_scratch: bool = False
    threads: int = 1
    """torch threads while the demo runs. One: the tiny model's matrices are too small to gain from
    more, and with two threads a second busy process on a 2-core machine made training steps
    ~20x slower (OpenMP threads waiting on each other); measured in benchmarks/RESULTS.md."""
    workers: int = 0
    """Rows trained side by side, each in a worker process with ``threads`` threads; 0: as many
    as this process's cores allow (two on a 2-core laptop, which halves the demo's time)."""
    rows: tuple[str, ...] = field(default_factory=lambda: tuple(row.name for row in ROWS))

    @classmethod
    def create(cls, out: str | Path = "runs/demo", quick: bool = False, seeds: int = 1, from_scratch: bool = False,
               **overrides) -> "DemoSettings":
        settings = cls(out=Path(out), quick=quick, seeds=seeds, from_scratch=from_scratch)
        if quick:
            settings.train_rows, settings.eval_queries, settings.eval_candidates = 200, 10, 20
            settings.steps, settings.batch_size, settings.rerank_top = 12, 8, 3
            settings.video_clips, settings.pages = 2, 4
        for key, value in overrides.items():
            if value is not None:
                setattr(settings, key, value)
        if settings.seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {settings.seeds}")
        if not 1 <= settings.steps <= DEMO_MAX_STEPS:
            raise ValueError(f"steps (--steps) must be within 1..{DEMO_MAX_STEPS}, got {settings.steps}")
        if settings.backbone not in BACKBONES:
            raise ValueError(f"unknown demo backbone {settings.backbone!r}; known: {list(BACKBONES)}")
        if settings.image_size is None:
            settings.image_size = backbone_image_size(settings.backbone)
        if settings.threads < 1:
            raise ValueError(f"threads must be >= 1, got {settings.threads}")
        if settings.workers < 0:
            raise ValueError(f"workers must be >= 0 (0: one per free core), got {settings.workers}")
        unknown = set(settings.rows) - {row.name for row in ALL_ROWS}
        if unknown:
            raise ValueError(f"unknown ablation rows {sorted(unknown)}; known: {[row.name for row in ALL_ROWS]}")
        if settings.from_scratch and FROM_SCRATCH.name not in settings.rows:
            settings.rows = (*settings.rows, FROM_SCRATCH.name)
        if FROM_SCRATCH.name in settings.rows and settings.backbone == RANDOM_BACKBONE:
            raise ValueError("--from-scratch compares a pretrained start with a random one: use it with "
                             "--backbone tiny-pretrained (the default), not with the random --backbone tiny")
        return settings

    def worker_count(self, jobs: int) -> int:
        """How many worker processes run ``jobs`` (row, seed) trainings: ``workers``, or with 0
        the cores this process may run on divided by ``threads``; never more than the jobs."""
        wanted = self.workers
        if not wanted:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            wanted = cores // self.threads
        return max(1, min(wanted, jobs))

    def selected_rows(self) -> list[AblationRow]:
        return [row for row in ALL_ROWS if row.name in self.rows]
