"""The code on an export's model card runs, and says what the model was fine-tuned from.

Each ```python block of the card is run as written, in a child process whose import system
refuses ``rematch`` (as on a machine that only has the export), from the export directory
with a ``photo.jpg`` beside it. The by-hand transformers recipe must give
``ReMatchModel.encode``'s vectors; before issue 25 it failed without ``mm_token_type_ids``,
and the card of a model fine-tuned from ``tiny-pretrained`` said "tiny randomly initialised".
"""

from __future__ import annotations

import os
import re
import sys

import numpy as np
import pytest
import torch

from rematch import ReMatchModel
from rematch.export import export_model
from rematch.hub.card import render_card
from tests.support.imports import import_quietly
from tests.support.processes import NO_REMATCH, run_with_deadline
from tests.support.serving import cosines, shape_image

MIN_COSINE = 0.9999


def python_blocks(card: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card, re.DOTALL)


def trained(model: ReMatchModel, seed: int) -> ReMatchModel:
    """Heads moved from their init, as after training (so the card calls the model fine-tuned)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tokens in (model.query_tokens, model.document_tokens):
            tokens.add_(0.05 * torch.randn(tokens.shape, generator=generator))
    return model


def run_block(block: str, directory, tail: str = "") -> str:
    script = directory / "card_block.py"
    script.write_text(NO_REMATCH + block + tail, encoding="utf-8")
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = run_with_deadline([sys.executable, str(script)], cwd=directory, text=True,
                               env=dict(environment, OMP_NUM_THREADS="1", PYTHONPATH=str(directory)))
    script.unlink()
    assert result.returncode == 0, f"{block}\n---\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_every_code_block_of_a_transformers_export_card_runs(tmp_path, family):
    model = trained(ReMatchModel.tiny(backbone=family, num_tokens=4, seed=2, min_pixels=28 * 28,
                                      max_pixels=56 * 56), 2)
    out = export_model(model, tmp_path / "export", allow_untrained=True)
    shape_image("red", "circle", side=70).save(out / "photo.jpg")
    card = (out / "README.md").read_text()
    blocks = python_blocks(card)
    assert len(blocks) == 2 and "mm_token_type_ids" in blocks[1]

    run_block(blocks[0], out)  # the ExportedEmbedder lines
    save = "\nimport numpy\nnumpy.save('by_hand_query.npy', query.numpy())\nnumpy.save('by_hand_document.npy', " \
           "document.numpy())\n"
    printed = run_block(blocks[1], out, save)
    query, document = np.load(out / "by_hand_query.npy"), np.load(out / "by_hand_document.npy")
    assert cosines(query, model.encode(["a red circle"], role="query")[0]) >= MIN_COSINE
    expected = model.encode([{"image": str(out / "photo.jpg")}], role="document")[0]
    assert cosines(document, expected) >= MIN_COSINE
    assert abs(float(printed.strip().splitlines()[-1]) - float(query @ document)) < 1e-5


def test_every_code_block_of_a_sentence_transformers_export_card_runs(tmp_path):
    import_quietly("sentence_transformers")
    model = trained(ReMatchModel.tiny(num_tokens=4, seed=4, min_pixels=28 * 28, max_pixels=56 * 56), 4)
    out = export_model(model, tmp_path / "export", "sentence-transformers", allow_untrained=True)
    shape_image("blue", "star").save(out / "photo.jpg")
    (block,) = python_blocks((out / "README.md").read_text())
    save = "\nimport numpy\nnumpy.save('q.npy', queries)\nnumpy.save('d.npy', documents)\n"
    run_block(block, out, save)
    assert cosines(np.load(out / "q.npy"), model.encode(["a red circle"], role="query")).min() >= MIN_COSINE
    expected = model.encode([{"image": str(out / "photo.jpg")}, "a blue star"], role="document")
    assert cosines(np.load(out / "d.npy"), expected).min() >= MIN_COSINE


def test_the_card_says_what_the_model_was_fine_tuned_from():
    pretrained = render_card({"backbone": "tiny-pretrained", "tiny_family": "qwen2_vl", "num_tokens": 16},
                             model_type="qwen2_vl", trained=True)
    assert "fine-tuned from `tiny-pretrained`" in pretrained and "randomly initialised" not in pretrained
    hub = render_card({"backbone": "Qwen/Qwen2-VL-2B-Instruct", "num_tokens": 16}, model_type="qwen2_vl",
                      trained=True)
    assert "fine-tuned from `Qwen/Qwen2-VL-2B-Instruct`" in hub
    random_start = render_card({"backbone": "tiny", "tiny_family": "qwen2_vl", "num_tokens": 4},
                               model_type="qwen2_vl", trained=True)
    assert "fine-tuned from `tiny` (a tiny qwen2_vl with random weights, for tests)" in random_start
    untrained = render_card({"backbone": "tiny", "num_tokens": 4}, model_type="qwen2_vl", trained=False)
    assert "untrained (random) ReMatch heads" in untrained and "fine-tuned" not in untrained


def test_a_saved_model_card_knows_whether_it_was_trained(tmp_path):
    fine_tuned = trained(ReMatchModel.tiny(pretrained=True, num_tokens=2), 1)
    fine_tuned.save_pretrained(tmp_path / "fine-tuned")
    card = (tmp_path / "fine-tuned" / "README.md").read_text()
    assert "fine-tuned from `tiny-pretrained`" in card and "randomly initialised" not in card
    ReMatchModel.tiny(num_tokens=2).save_pretrained(tmp_path / "untrained")
    assert "untrained (random) ReMatch heads" in (tmp_path / "untrained" / "README.md").read_text()
