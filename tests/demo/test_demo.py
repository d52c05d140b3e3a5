"""The demo pipeline at minimal size: report structure, and every table number traced to an evaluation run."""

from __future__ import annotations

import json
import math
import os
import re

import pytest

from rematch.cli import main
from rematch.demo import ROWS, DemoSettings, run_demo
from rematch.demo.report import COLUMNS, SHORT, score
from rematch.demo.settings import SUBSETS
from rematch.matching import VIEW_KINDS

pytestmark = pytest.mark.slow  # trains every ablation row


SMALL = dict(quick=True, train_rows=60, eval_queries=4, eval_candidates=8, steps=2, batch_size=4, rerank_top=2)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The whole demo at minimal size, its rows trained by two worker processes (as on a 2-core laptop)."""
    settings = DemoSettings.create(out=tmp_path_factory.mktemp("demo"), workers=2, **SMALL)
    lines = []
    result = run_demo(settings, log=lines.append)
    result.lines = lines
    return result


def parse_table(markdown: str, title: str) -> dict[str, list[str]]:
    section = markdown.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 1 + len(COLUMNS) and cells[0] not in ("row",) and not set(cells[1]) <= {"-"}:
            rows[cells[0]] = cells[1:]
    return rows


def test_report_has_every_section_and_file(demo):
    report = demo.report.read_text()
    for heading in ("## Ablation (Precision@1 = hit@1, %)", "## Ablation (MRR x 100)", "## The question the demo asks",
                    "## Reranking the top 2", "## Training and evaluation throughput", "## Loss curves",
                    "## Retrieval examples", "## Index and search", "## Video and page tasks", "## Reproduce"):
        assert heading in report
    out = demo.settings.out
    for name in ("loss_curves.png", "retrieval_examples.png", "full_config.yaml", "demo_results.json"):
        assert (out / name).stat().st_size > 0
    assert len(demo.searches) == 2 and all(len(s["hits"]) == 5 for s in demo.searches)
    assert "{" not in report and "TODO" not in report and "nan" not in report.lower()
    assert "the rows trained by 2 worker processes side by side" in report


def test_the_full_model_runs_the_video_and_page_tasks(demo):
    """Both new modalities end to end: the world's clips through the video path, its pages as
    document images; the report's numbers are the MMEB-V2 evaluation's."""
    summary = json.loads((demo.settings.out / "eval-video-pages" / "summary.json").read_text())
    assert set(demo.video_and_pages) == {"ShapesVideoRet", "ShapesMotionCLS", "ShapesVideoQA", "ShapesPages"}
    section = demo.report.read_text().split("## Video and page tasks (full model, MMEB-V2 layouts)", 1)[1]
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in section.split("\n## ")[0].splitlines()
             if line.startswith("| Shapes")]
    table = {row[0]: row[1:] for row in cells}
    for name, row in demo.video_and_pages.items():
        assert row["score"] == summary["tasks"][name]["score"] and row["queries"] > 0
        assert table[name] == [row["metric"], f"{100 * row['score']:.1f}", str(row["queries"])]


def test_every_table_number_comes_from_an_evaluation_run(demo):
    table = parse_table(demo.report.read_text(), "Ablation (Precision@1 = hit@1, %)")
    assert list(table) == [row.label for row in ROWS]
    for row in ROWS:
        summary = json.loads((demo.settings.out / "runs" / row.name / "seed0" / "eval" / "summary.json").read_text())
        expected = [f"{score(summary, column):.1f}" for column in COLUMNS]
        assert table[row.label] == expected, row.name
        assert all(re.fullmatch(r"\d+\.\d", cell) for cell in table[row.label])


def test_the_rerank_table_says_where_each_matching_loss_ended(demo):
    """Reranking is read beside the matching loss it was trained to (ln 2: a head at chance)."""
    section = demo.report.read_text().split("## Reranking the top 2", 1)[1].split("\n## ", 1)[0]
    cells = {row[0]: row[1:] for row in ([c.strip() for c in line.strip().strip("|").split("|")]
                                         for line in section.splitlines() if line.startswith("| "))}
    assert cells["row"][-1] == "matching loss" and "ln 2 = 0.693" in section
    reranked = [row for row in ROWS if row.uses_matching]
    assert reranked
    for row in reranked:
        record = next(r for r in demo.records if r.row == row.name)
        assert cells[row.label][-1] == f"{record.train['final_losses']['matching']:.3f}", row.name


def test_the_rerank_table_gives_each_view_kinds_matching_loss_and_accuracy_over_the_last_steps(demo):
    """Per kind of (query view, document view) pair: loss / accuracy, the mean over the run's last
    10% of logged steps (its losses.jsonl), as the matching-loss cell beside them."""
    section = demo.report.read_text().split("## Reranking the top 2", 1)[1].split("\n## ", 1)[0]
    cells = {row[0]: row[1:] for row in ([c.strip() for c in line.strip().strip("|").split("|")]
                                         for line in section.splitlines() if line.startswith("| "))}
    assert cells["row"][-5:] == [*VIEW_KINDS, "matching loss"]
    assert "last 10% of training steps" in section
    for row in (row for row in ROWS if row.uses_matching):
        record = next(r for r in demo.records if r.row == row.name)
        log = [json.loads(line) for line in (record.directory / "losses.jsonl").read_text().splitlines()]
        last = log[-max(1, math.ceil(len(log) / 10)):]

        def mean(column: str) -> float:
            return sum(entry[column] for entry in last) / len(last)

        for kind, cell in zip(VIEW_KINDS, cells[row.label][-5:-1]):
            assert cell == f"{mean(f'matching_loss/{kind}'):.3f} / {100 * mean(f'matching_accuracy/{kind}'):.0f}%", \
                (row.name, kind)
        assert cells[row.label][-1] == f"{mean('matching'):.3f}", row.name


def test_a_row_measures_the_same_in_a_worker_process_as_in_this_one(demo, tmp_path):
    """Rows trained side by side in worker processes give the numbers a one-after-another run
    gives (same seeds, same thread count), come back in row order, and each prints its one line."""
    rows = ("baseline", "full")
    alone = run_demo(DemoSettings.create(out=tmp_path, workers=1, rows=rows, video_clips=0, pages=0, **SMALL),
                     log=lambda *_: None)
    assert [r.row for r in demo.records] == [row.name for row in ROWS]
    in_workers = {r.row: r for r in demo.records}
    def measured(evaluation):  # everything but the clock; the fingerprint covers the trained weights
        return {name: {k: v for k, v in subset.items() if k != "seconds"}
                for name, subset in (evaluation or {}).get("subsets", {}).items()}

    for record in alone.records:
        twin = in_workers[record.row]
        assert record.train["final_losses"] == twin.train["final_losses"], record.row
        assert measured(record.evaluation) == measured(twin.evaluation), record.row
        assert measured(record.reranked) == measured(twin.reranked), record.row
    assert sorted(line.split()[0] for line in demo.lines if " seed 0: trained " in line) == sorted(r.name for r in ROWS)


def test_worker_count_follows_the_cores_and_the_jobs():
    settings = DemoSettings.create(out="unused", workers=0)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert settings.worker_count(100) == max(1, cores) and settings.worker_count(1) == 1
    assert DemoSettings.create(out="unused", workers=3).worker_count(2) == 2
    with pytest.raises(ValueError, match="workers must be >= 0"):
        DemoSettings.create(out="unused", workers=-1)


def test_rows_share_budget_and_seed_and_differ_only_in_their_ingredients(demo):
    configs = {row.name: (demo.settings.out / "runs" / row.name / "seed0" / "config.yaml").read_text() for row in ROWS}
    for text in configs.values():
        assert "steps: 2" in text and "batch_size: 4" in text and "seed: 0" in text
    assert "num_tokens: 0" in configs["baseline"] and "num_tokens: 16" in configs["full"]
    assert "hard_negatives: false" in configs["baseline"] and "hard_negatives: true" in configs["hard_negative"]
    # every row fine-tunes the shipped pretrained start, its tower frozen (the paper: LoRA on the language model)
    assert all("backbone: tiny-pretrained" in t and "freeze_vision: true" in t for t in configs.values())


def test_cli_demo_prints_the_table_also_from_the_random_start(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path), "--rows", "baseline", "--steps", "1",
                 "--backbone", "tiny", "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "Precision@1" in printed and "VLM2Vec-style baseline" in printed
    assert all(SHORT[s] in printed for s in SUBSETS)
    assert "SMOKE TEST (--quick: 1 steps per row" in printed  # its numbers say what they are
    config = (tmp_path / "runs" / "baseline" / "seed0" / "config.yaml").read_text()
    # a random tower must learn to see; 56 px, the random start's size
    assert "backbone: tiny\n" in config and "freeze_vision: false" in config and "max_pixels: 3136" in config


def test_demo_on_the_pretrained_start_with_a_from_scratch_row(tmp_path, capsys, cli_error):
    """By default every row fine-tunes the shipped backbone (at its 112 px); --from-scratch adds
    the full recipe from a random backbone, same budget, as its own row."""
    assert main(["demo", "--quick", "--out", str(tmp_path), "--rows", "full", "--steps", "1",
                 "--from-scratch"]) == 0
    printed = capsys.readouterr().out
    assert "full ReMatch (+ orthogonality)" in printed and "random start (no pre-training)" in printed
    configs = {row: (tmp_path / "runs" / row / "seed0" / "config.yaml").read_text() for row in ("full", "from_scratch")}
    assert "backbone: tiny-pretrained" in configs["full"] and "backbone: tiny\n" in configs["from_scratch"]
    # the pretrained tower stays as it is (the paper: LoRA on the language model); a random one learns to see
    assert "freeze_vision: true" in configs["full"] and "freeze_vision: false" in configs["from_scratch"]
    for text in configs.values():
        assert "max_pixels: 12544" in text and "steps: 1" in text  # 112 px, same budget
    assert "pretrained generatively" in (tmp_path / "report.md").read_text()
    # a from-scratch row next to a random start compares nothing
    assert "--backbone tiny-pretrained" in cli_error(["demo", "--quick", "--out", tmp_path / "x", "--backbone", "tiny",
                                                      "--from-scratch"])
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit):  # argparse's own usage error
        main(["demo", "--quick", "--out", str(tmp_path / "y"), "--workers", "-1"])
    assert "--workers: expected an integer >= 0" in capsys.readouterr().err
