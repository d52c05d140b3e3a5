"""Evaluation input limits on a real tiny model: applied for the run, restored after, kept apart in the cache."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rematch import Item
from rematch.cli import main
from rematch.data.records import EvalExample, RowRef
from rematch.world.scenes import Scene, ShapeObject, render
from rematch.evaluation import CachedEncoder, InputLimits, evaluate_mmeb, input_limits, load_summary
from rematch.evaluation.settings import OFFICIAL_MMEB_V1_QWEN2VL, InputLimitsError, current_limits, resolve_limits

LONG_TEXT = "a red circle next to a blue star on a white background " * 6


@pytest.fixture(scope="module")
def big_picture(tmp_path_factory) -> str:
    """Large enough (168 x 168) that a 56 x 56 pixel cap really shrinks it."""
    path = tmp_path_factory.mktemp("big") / "scene.png"
    render(Scene((ShapeObject("red", "circle", "large", 0.5, 0.5),)), side=168).save(path)
    return str(path)


def test_input_limits_change_the_inputs_and_restore_the_model(tiny_model, big_picture):
    adapter = tiny_model.adapter
    own_config, own_size = adapter.config, dict(adapter.processor.image_processor.size)
    fingerprint = tiny_model.fingerprint()
    item = Item(image=big_picture, text=LONG_TEXT)
    before = adapter.prepare([item], tiny_model.num_tokens)

    with input_limits(tiny_model, max_pixels=56 * 56, max_text_tokens=4) as applied:
        assert applied == InputLimits(own_config.min_pixels, 56 * 56, 4, preset="custom")
        assert current_limits(tiny_model) == InputLimits(own_config.min_pixels, 56 * 56, 4, preset="model")
        assert adapter.processor.image_processor.size == {"shortest_edge": own_config.min_pixels,
                                                           "longest_edge": 56 * 56}
        inside = adapter.prepare([item], tiny_model.num_tokens)
        assert tiny_model.fingerprint() == fingerprint  # an evaluation setting, not a different model
    assert before.image_grid_thw.tolist() == [[1, 12, 12]] and inside.image_grid_thw.tolist() == [[1, 4, 4]]
    assert inside.input_ids.shape[1] < before.input_ids.shape[1] - 100  # fewer image tokens, text cut at 4

    assert adapter.config is own_config and adapter.processor.image_processor.size == own_size
    after = adapter.prepare([item], tiny_model.num_tokens)
    assert torch_equal(after.input_ids, before.input_ids) and torch_equal(after.pixel_values, before.pixel_values)

    with pytest.raises(RuntimeError, match="boom"), input_limits(tiny_model, max_pixels=56 * 56):
        raise RuntimeError("boom")
    assert adapter.config is own_config and adapter.processor.image_processor.size == own_size


def torch_equal(a, b) -> bool:
    return a.shape == b.shape and bool((a == b).all())


def test_bad_limits_are_errors_that_name_the_value(tiny_model):
    with pytest.raises(InputLimitsError, match=r"min_pixels \(5000\) > max_pixels \(4000\)"):
        resolve_limits("official", min_pixels=5000, max_pixels=4000)
    with pytest.raises(InputLimitsError, match="max_text_tokens must be >= 0"):
        resolve_limits("official", max_text_tokens=-1)
    with pytest.raises(InputLimitsError, match="max_pixels must be >= 784"):
        resolve_limits("official", max_pixels=100)
    with pytest.raises(InputLimitsError, match="needs the model"):
        resolve_limits("model")
    with pytest.raises(InputLimitsError, match="unknown input limits preset"):
        resolve_limits("leaderboard")
    with pytest.raises(InputLimitsError, match="min_pixels must be >= 1"), input_limits(tiny_model, min_pixels=0):
        pass
    with pytest.raises(TypeError, match="no backbone adapter"), input_limits(object(), max_pixels=1000):
        pass
    assert resolve_limits("model", tiny_model, max_text_tokens=7) == InputLimits(
        tiny_model.config.min_pixels, tiny_model.config.max_pixels, 7, preset="model")
    assert resolve_limits("official") == OFFICIAL_MMEB_V1_QWEN2VL
    assert resolve_limits("official").as_dict() == {"preset": "official", "min_pixels": 3136, "max_pixels": 1003520,
                                                    "max_text_tokens": 0, "matches_official": True}


def test_the_cache_keeps_input_limits_apart(tiny_model, big_picture, tmp_path):
    items = [Item(image=big_picture, text="Represent the given image.")]
    encoder = CachedEncoder(tiny_model, tmp_path)
    own = encoder.encode(items, "document")
    with input_limits(tiny_model, max_pixels=56 * 56):
        small = encoder.encode(items, "document")  # a vector at another resolution: encoded, not served
        assert encoder.stats.encoded == 2 and encoder.stats.cached == 0
        np.testing.assert_array_equal(encoder.encode(items, "document"), small)  # now cached under its own key
    assert not np.allclose(own, small, atol=1e-4)
    np.testing.assert_array_equal(encoder.encode(items, "document"), own)
    assert encoder.stats.encoded == 2 and encoder.stats.cached == 2
    assert encoder.fingerprint == tiny_model.fingerprint()  # one cache file per model, rows keyed by limits


def test_evaluate_mmeb_applies_the_limits_for_the_run_only(tiny_model, big_picture, tmp_path):
    def examples():
        return {"VisDial": [EvalExample(Item(text=f"{LONG_TEXT} {n}"), (Item(image=big_picture), Item(text=f"x{n}")),
                                        "VisDial", RowRef("v.jsonl", n)) for n in range(3)]}

    own_config = tiny_model.adapter.config
    small = InputLimits(min_pixels=56 * 56, max_pixels=56 * 56, max_text_tokens=8, preset="custom")
    cache = tmp_path / "cache"
    first = evaluate_mmeb(tiny_model, examples(), tmp_path / "own", cache_dir=cache, plot=False, log=None)
    second = evaluate_mmeb(tiny_model, examples(), tmp_path / "small", cache_dir=cache, plot=False, log=None,
                           limits=small)
    assert tiny_model.adapter.config is own_config
    unique = 3 + 4  # three queries; one image and three texts as candidates
    assert second["throughput"]["items_encoded"] == unique and second["throughput"]["items_from_cache"] == 0
    assert second["input_limits"] == {"preset": "custom", "min_pixels": 3136, "max_pixels": 3136,
                                      "max_text_tokens": 8, "matches_official": False}
    written = json.loads((tmp_path / "small" / "VisDial.json").read_text())
    assert written["input_limits"] == second["input_limits"]
    assert first["input_limits"]["max_pixels"] == own_config.max_pixels
    third = evaluate_mmeb(tiny_model, examples(), None, cache_dir=cache, log=None)
    assert third["throughput"]["items_from_cache"] == unique and third["throughput"]["items_encoded"] == 0
    assert third["subsets"]["VisDial"]["mrr"] == first["subsets"]["VisDial"]["mrr"]


def test_cli_input_limit_flags(tmp_path, pictures_root, capsys):
    root, out = pictures_root, tmp_path / "run"
    base = ["eval", "mmeb", "--model", "tiny", "--allow-untrained", "--data", str(root), "--no-cache", "--no-plot"]
    assert main(base + ["--out", str(out), "--max-pixels", "100"]) == 1
    assert "rematch: error: --max-pixels must be >= 784" in capsys.readouterr().err
    assert not out.exists()  # refused before any model was loaded or file written
    assert main(base + ["--out", str(out), "--input-limits", "model", "--max-text-tokens", "7"]) == 0
    limits = load_summary(out)["input_limits"]
    assert limits["preset"] == "model" and limits["max_text_tokens"] == 7 and not limits["matches_official"]
    assert main(base + ["--out", str(tmp_path / "official"), "--max-pixels", "200704"]) == 0
    limits = load_summary(tmp_path / "official")["input_limits"]
    assert (limits["preset"], limits["max_pixels"], limits["max_text_tokens"]) == ("official", 200704, 0)
    assert "NOT the official MMEB-V1 values" in (tmp_path / "official" / "summary.md").read_text()


@pytest.fixture()
def pictures_root(tmp_path, big_picture):
    root = tmp_path / "mmeb"
    (root / "VOC2007").mkdir(parents=True)
    rows = [{"qry_text": f"<|image_1|> Represent the given image {n}.", "qry_img_path": big_picture,
             "tgt_text": ["cat", "dog"], "tgt_img_path": ["", ""]} for n in range(2)]
    (root / "VOC2007" / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


@pytest.mark.parametrize("recipe", ["rematch-qwen2vl-2b", "rematch-qwen2.5vl-3b", "rematch-qwen2.5vl-7b",
                                    "rematch-qwen3vl-2b", "rematch-qwen3vl-4b", "rematch-qwen3vl-8b"])
def test_the_paper_recipes_train_at_the_resolution_and_with_the_target_prompts_eval_mmeb_uses(recipe):
    from pathlib import Path

    from rematch.config import load_config

    config = load_config(Path(__file__).resolve().parents[2] / "configs" / f"{recipe}.yaml")
    official = OFFICIAL_MMEB_V1_QWEN2VL
    assert (config.model.min_pixels, config.model.max_pixels) == (official.min_pixels, official.max_pixels)
    assert config.model.target_prompt_style == "b3" and config.model.document_instructions
    # GradCache chunks and the matching sub-batch divide the 128 samples a process holds (README's estimate)
    assert config.train.batch_size == 128 and 128 % config.train.grad_cache_chunk == 0
    assert 0 < config.loss.matching_samples <= 16


def test_target_prompt_style_is_swapped_for_the_call_and_changes_the_fingerprint(tiny_model):
    from rematch.evaluation.settings import with_target_prompt_style

    own, fingerprint = tiny_model.config, tiny_model.fingerprint()
    with with_target_prompt_style(tiny_model, "system") as style:
        assert style == "system" and tiny_model.config.target_prompt_style == "system"
        assert tiny_model.fingerprint() != fingerprint  # another way of encoding documents, another cache
    assert tiny_model.config is own and tiny_model.fingerprint() == fingerprint
    with pytest.raises(InputLimitsError, match="target prompt style must be one of b3, system"):
        with with_target_prompt_style(tiny_model, "b4"):
            pass
