"""Qwen3-VL backbones (tiny, random, the real transformers classes): our split forward is transformers' own.

The adapter computes position ids itself and runs the language model on embeddings it
may have edited, so everything is checked against plain transformers on the same inputs:
its ``get_rope_index`` ids and its ``Qwen3VLModel.forward`` (which adds the DeepStack
vision features inside the language model). Then the ReMatch paths on top: encoding,
save/load, packed matching, training and resume.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.support.matching import assert_packed_equals_reference
from rematch import Item, ReMatchModel
from rematch.backbones import build_tiny_backbone
from rematch.backbones.base import DeepStack
from rematch.backbones.tiny import interleaved_mrope_section
from rematch.config import load_config
from rematch.world.scenes import Scene, ShapeObject, render
from rematch.matching import MatchSample
from rematch.training.loop import train
from tests.support import REPO

SMALL_IMAGES = dict(min_pixels=32 * 32, max_pixels=96 * 96)  # 1 to 9 image tokens per image


@pytest.fixture(scope="module")
def qwen3_model() -> ReMatchModel:
    return ReMatchModel.tiny(backbone="qwen3_vl", num_tokens=4, seed=0, **SMALL_IMAGES)


@pytest.fixture(scope="module")
def pictures() -> list[Image.Image]:
    red = render(Scene((ShapeObject("red", "circle", "large", 0.5, 0.5),)))
    two = render(Scene((ShapeObject("blue", "star", "small", 0.3, 0.5),
                        ShapeObject("green", "square", "large", 0.7, 0.5))))
    return [red, two.resize((100, 70)), red.resize((40, 90))]  # sides not multiples of 32


def mixed_items(pictures) -> list[Item]:
    """Text only, image only and image + text rows of different lengths (so rows are left padded)."""
    return [Item(text="a small blue star left of a large green square, and a red circle above them"),
            Item(image=pictures[0]),
            Item(image=pictures[1], text="What colour is the star?", instruction="Answer the question."),
            Item(image=pictures[2], text="<|image_1|> Identify the object in the image.")]


def transformers_states(model: ReMatchModel, batch) -> torch.Tensor:
    """Plain transformers: Qwen3VLModel.forward on the batch's tokens, computing its own position ids."""
    with torch.no_grad():
        return model.adapter.core(model.backbone)(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values,
            image_grid_thw=batch.image_grid_thw, mm_token_type_ids=batch.mm_token_type_ids).last_hidden_state


def test_image_sides_are_multiples_of_32_and_patches_are_16_px(qwen3_model, pictures):
    adapter = qwen3_model.adapter
    assert type(adapter).__name__ == "Qwen3VLAdapter" and adapter.image_factor == 32
    batch = qwen3_model.prepare([Item(image=pictures[1])])  # 100 x 70 px -> 96 x 64 px
    assert batch.image_grid_thw.tolist() == [[1, 4, 6]]  # 16 px patches
    assert batch.pixel_values.shape == (24, 3 * 2 * 16 * 16)
    assert int(batch.mm_token_type_ids.sum()) == 24 // 4  # 2 x 2 merge
    assert adapter.estimate_length(Item(image=pictures[1])) >= 6


def test_interleaved_mrope_section_fits_half_the_head_dim():
    assert interleaved_mrope_section(128) == [24, 20, 20]  # the published Qwen3-VL split
    for head_dim in (32, 64, 128):
        section = interleaved_mrope_section(head_dim)
        assert sum(section) == head_dim // 2 and 3 * section[1] <= head_dim // 2 + 1
    model, _ = build_tiny_backbone("qwen3_vl", "tiny")
    text = model.config.text_config
    assert sum(text.rope_parameters["mrope_section"]) == text.head_dim // 2
    assert list(model.config.vision_config.deepstack_visual_indexes) == [0, 1]


def test_position_ids_equal_transformers_get_rope_index(qwen3_model, pictures):
    batch = qwen3_model.prepare(mixed_items(pictures))
    assert not batch.attention_mask.bool().all()  # left padding present
    expected, _ = qwen3_model.adapter.core(qwen3_model.backbone).get_rope_index(
        batch.input_ids, batch.mm_token_type_ids, image_grid_thw=batch.image_grid_thw,
        attention_mask=batch.attention_mask)
    valid = batch.attention_mask.bool()
    assert torch.equal(batch.position_ids[:, valid], expected[:, valid])


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding-free"])
def test_last_hidden_state_equals_the_transformers_forward(pictures, padding_free):
    model = ReMatchModel.tiny(backbone="qwen3_vl", num_tokens=0, pooling="last", padding_free=padding_free, **SMALL_IMAGES)
    batch = model.prepare(mixed_items(pictures))
    reference = transformers_states(model, batch)
    adapter, valid = model.adapter, batch.attention_mask.bool()
    with torch.no_grad():
        embeds, deepstack = adapter.embed_inputs(model.backbone, batch.input_ids, batch.pixel_values,
                                                 batch.image_grid_thw)
        ours = adapter.language_model(model.backbone, embeds, batch.attention_mask, batch.position_ids, deepstack)
        without = adapter.language_model(model.backbone, embeds, batch.attention_mask, batch.position_ids)
        pooled = model.embed(batch, "query").token_states[:, -1]  # K=0: the last token's state
    assert isinstance(deepstack, DeepStack) and len(deepstack.layers) == 2
    torch.testing.assert_close(ours[valid], reference[valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, reference[:, -1], atol=1e-5, rtol=1e-5)
    assert (without[valid] - reference[valid]).abs().max() > 1e-2  # DeepStack matters: it must be carried
    with pytest.raises(ValueError, match="DeepStack"):
        adapter.input_embeddings(model.backbone, batch.input_ids, batch.pixel_values, batch.image_grid_thw)


def test_precomputed_image_features_carry_deepstack_and_slice_by_rows(qwen3_model, pictures):
    """The frozen-tower cache hands the tower's outputs to every pass (GradCache chunks slice them)."""
    batch = qwen3_model.prepare(mixed_items(pictures))
    adapter = qwen3_model.adapter
    with torch.no_grad():
        features = adapter.image_features(qwen3_model.backbone, batch.pixel_values, batch.image_grid_thw)
        assert features.shape == (sum(batch.image_token_counts()), 3 * qwen3_model.hidden_size)
        direct = qwen3_model.embed(batch, "document").embedding
        cached = dataclasses.replace(batch, image_features=features)
        torch.testing.assert_close(qwen3_model.embed(cached, "document").embedding, direct, atol=1e-6, rtol=1e-6)
        chunk = qwen3_model.embed(cached.rows(1, 3), "document").embedding
    torch.testing.assert_close(chunk, direct[1:3], atol=1e-5, rtol=1e-5)


def test_encode_does_not_depend_on_the_batch(qwen3_model, pictures):
    items = mixed_items(pictures)
    together = qwen3_model.encode(items, batch_size=4)
    alone = np.concatenate([qwen3_model.encode([item], batch_size=1) for item in items])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    assert np.isfinite(together).all() and len({tuple(np.round(row, 4)) for row in together}) == len(items)


def test_save_and_load_round_trip(qwen3_model, pictures, tmp_path):
    qwen3_model.save_pretrained(tmp_path / "model")
    reloaded = ReMatchModel.from_pretrained(tmp_path / "model", device="cpu")
    assert reloaded.backbone.config.model_type == "qwen3_vl" and reloaded.adapter.image_factor == 32
    assert json.loads((tmp_path / "model" / "preprocessor_config.json").read_text())["patch_size"] == 16
    items = mixed_items(pictures)
    before, after = qwen3_model.encode(items), reloaded.encode(items)
    assert (before * after).sum(axis=1).min() >= 0.9999


def test_packed_matching_equals_the_reference(qwen3_model, pictures):
    samples = [
        MatchSample(Item(text="a large red circle", instruction="Find me an everyday image that matches"),
                    (Item(image=pictures[0]), Item(image=pictures[1], text="Represent the given image.")),
                    (True, False)),
        MatchSample(Item(text="<|image_1|> What colour is the circle?", image=pictures[2]),
                    (Item(text="purple"), Item(text="red")), (False, True)),
    ]
    model = qwen3_model
    packed, reference = assert_packed_equals_reference(model, samples, model.config.matching_instruction)
    assert packed.image_grid_thw.shape[0] == 3 and reference.input_ids.shape[0] == 16


# ------------------------------------------------------------------ training, resume, recipes


def qwen3_train_config(out, *overrides):
    return load_config(REPO / "configs" / "demo-tiny.yaml", [
        f"train.out={out}", "model.tiny_family=qwen3_vl", "train.steps=2", "train.batch_size=4",
        "train.save_every=1", "train.warmup_ratio=0", "data.builtin_train_rows=16", "model.num_tokens=4",
        "loss.matching_samples=2", "model.max_pixels=4096", *overrides])


@pytest.mark.slow
def test_training_steps_then_resume_equals_the_uninterrupted_run(tmp_path):
    reference = tmp_path / "reference"
    result = train(qwen3_train_config(reference), show_progress=False, log=lambda *_: None)
    rows = [json.loads(line) for line in (reference / "losses.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    assert all(np.isfinite(row[k]) for row in rows for k in ("contrastive", "orthogonality", "matching"))
    trained = ReMatchModel.from_pretrained(result.model_dir, device="cpu")
    fresh = ReMatchModel.tiny(backbone="qwen3_vl", num_tokens=4, max_pixels=4096)
    merger = "model.visual.deepstack_merger_list.0.linear_fc2.weight"  # DeepStack's path gets gradients
    assert not torch.equal(trained.backbone.state_dict()[merger], fresh.backbone.state_dict()[merger])

    resumed = tmp_path / "resumed"
    shutil.copytree(reference, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000002")
    shutil.rmtree(resumed / result.model_dir.relative_to(reference))  # the finished run's model: written again
    messages = []
    train(qwen3_train_config(resumed, "train.resume=true"), show_progress=False, log=messages.append)
    assert any("resumed from" in str(m) and "step-00000001" in str(m) for m in messages)
    assert (resumed / result.model_dir.relative_to(reference)).is_dir()
    final = Path("checkpoints") / "step-00000002" / "trainable.safetensors"
    a, b = load_file(str(reference / final)), load_file(str(resumed / final))
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("size", ["2b", "4b", "8b"])
def test_recipes_load_and_validate(size):
    config = load_config(REPO / "configs" / f"rematch-qwen3vl-{size}.yaml")
    assert config.model.backbone == f"Qwen/Qwen3-VL-{size.upper()}-Instruct"
    assert config.model.max_pixels % (32 * 32) == 0 and config.lora.enabled and config.model.num_tokens == 16
    assert config.train.out == f"runs/rematch-qwen3vl-{size}"


# ------------------------------------------------------------------ index, serve, export


def test_index_and_server_return_what_encode_returns(qwen3_model, tmp_path):
    from tests.support.serving import build_index, client, cosines, data_url, png_bytes, running_server, shape_image

    index = build_index(qwen3_model, tmp_path)
    query = shape_image("blue", "star").resize((100, 70))  # resized once to 96 x 64, as encode does
    expected = index.search([{"image": query}], k=4)[0]
    with running_server(qwen3_model, index) as server, client(server) as http:
        answer = http.post("/v1/embeddings", json={"input": [{"image": data_url(png_bytes(query))}],
                                                   "input_type": "query"}).json()
        found = http.post("/v1/search", json={"query": {"image": data_url(png_bytes(query))}, "k": 4}).json()
    served = np.array([row["embedding"] for row in answer["data"]])
    assert cosines(served, qwen3_model.encode([{"image": query}])).min() >= 0.9999
    assert [hit["id"] for hit in found["data"]] == [hit.id for hit in expected]


def test_the_system_turn_follows_qwen3_vl_chat_template(qwen3_model):
    """Qwen3-VL's template writes a system turn only for a system message (Qwen2-VL's writes "You are a
    helpful assistant." by default): an instruction gets one, an item without none, the matching prompt too."""
    adapter = qwen3_model.adapter
    plain = adapter.format_item(Item(text="a red circle"), 2)
    assert plain == "<|im_start|>user\na red circle<|im_end|>\n<|im_start|>assistant\n" + "<|endoftext|>" * 2
    instructed = adapter.format_item(Item(text="a red circle", instruction="Find the picture."), 2)
    assert instructed.startswith("<|im_start|>system\nFind the picture.<|im_end|>\n<|im_start|>user\na red circle")
    own_prompt = ReMatchModel.tiny(backbone="qwen3_vl", num_tokens=2, system_prompt="Be brief.", **SMALL_IMAGES)
    assert own_prompt.adapter.format_item(Item(text="x"), 0).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert adapter.chat_prefix(qwen3_model.config.system_prompt) == "<|im_start|>user\n"  # the matching prompt
    qwen2 = ReMatchModel.tiny(backbone="qwen2_vl", num_tokens=2)
    assert qwen2.adapter.format_item(Item(text="x"), 0).startswith(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    # vectors cached under the old layout (a system turn on every item) are never served to this one
    from rematch.encoding.cache import encoding_settings
    assert "format=" in encoding_settings(qwen3_model) and "format=" not in encoding_settings(qwen2)
