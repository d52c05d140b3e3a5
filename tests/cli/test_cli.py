"""The rematch command line, run in-process through its real entry point."""

from __future__ import annotations

import json

import numpy as np

from rematch import ReMatchModel
from rematch.cli import main


def test_tiny_then_encode_then_info(tmp_path, image_files, capsys):
    model_dir = tmp_path / "model"
    assert main(["tiny", "--out", str(model_dir), "--num-tokens", "4"]) == 0
    items = tmp_path / "items.jsonl"
    items.write_text("\n".join(json.dumps(row) for row in [
        {"id": "a", "text": "a large red circle"},
        {"id": "b", "image": image_files["rgb"], "text": "Represent the given image."},
    ]) + "\n")
    out = tmp_path / "vectors.npy"
    assert main(["encode", "--model", str(model_dir), "--input", str(items), "--role", "document",
                 "--out", str(out), "--allow-untrained"]) == 0  # a saved `rematch tiny` model is still untrained
    vectors = np.load(out)
    expected = ReMatchModel.from_pretrained(model_dir).encode(
        [{"text": "a large red circle"}, {"image": image_files["rgb"], "text": "Represent the given image."}],
        role="document")
    np.testing.assert_allclose(vectors, expected, atol=1e-6)
    assert main(["info", str(model_dir), "--json"]) == 0
    assert '"num_tokens": 4' in capsys.readouterr().out


def test_tiny_takes_num_tokens_and_still_the_old_k_spelling(tmp_path, capsys):
    assert main(["tiny", "--out", str(tmp_path / "a"), "--num-tokens", "3"]) == 0
    assert main(["tiny", "--out", str(tmp_path / "b"), "--k", "2"]) == 0
    assert "K=3" in capsys.readouterr().out
    assert ReMatchModel.from_pretrained(tmp_path / "a").num_tokens == 3
    assert ReMatchModel.from_pretrained(tmp_path / "b").num_tokens == 2
