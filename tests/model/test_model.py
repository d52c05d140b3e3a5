"""ReMatchModel on tiny real Qwen2-VL / Qwen2.5-VL models (random weights, real code paths)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rematch import Item, ReMatchModel
from rematch.serialization import HEADS_NAME, CheckpointMismatchError


def add_trained_looking_lora(model) -> None:
    """LoRA adapters whose B matrices are non-zero, so they change the embeddings (fresh ones do not)."""
    model.enable_lora(r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for name, parameter in model.backbone.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)


def mixed_items(images):
    return [
        {"text": "a large red circle"},
        {"image": images[0]},
        {"text": "<|image_1|> Represent the given image for classification", "image": images[1]},
        {"text": "a small blue star left of a large green square, described at some length " * 3,
         "instruction": "Find me an everyday image that matches the given caption:"},
        {"image": images[2], "text": "What colour is the triangle?"},
        {"text": "yellow"},
        {"image": images[1], "instruction": "Represent the given image."},
        {"text": "a"},
    ]


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_model_25"])
def test_encode_shapes_norms_and_modalities(request, fixture, shape_images):
    model = request.getfixturevalue(fixture)
    items = mixed_items(shape_images)
    for role in ("query", "document"):
        vectors = model.encode(items, role=role, batch_size=3)
        assert vectors.dtype == np.float32
        assert vectors.shape == (len(items), model.hidden_size)
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    text_only = model.encode([items[0], items[5]])
    image_only = model.encode([items[1]])
    assert text_only.shape == (2, model.hidden_size) and image_only.shape == (1, model.hidden_size)
    # the two roles use different learnable tokens, so they embed the same item differently
    query, document = model.encode(items[:1], role="query"), model.encode(items[:1], role="document")
    assert float((query @ document.T)[0, 0]) < 0.99999


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_model_25"])
def test_batch_invariance_alone_vs_padded_batch_of_8(request, fixture, shape_images):
    model = request.getfixturevalue(fixture)
    items = mixed_items(shape_images)
    together = model.encode(items, batch_size=8)
    for index, item in enumerate(items):
        alone = model.encode([item], batch_size=1)[0]
        assert float(alone @ together[index]) >= 0.9999, f"item {index} changed inside a padded batch"


def test_rows_come_back_in_input_order(tiny_model, shape_images):
    items = mixed_items(shape_images)
    forward = tiny_model.encode(items, batch_size=2)
    backward = tiny_model.encode(items[::-1], batch_size=2)
    np.testing.assert_allclose(forward, backward[::-1], atol=1e-5)
    assert tiny_model.encode([]).shape == (0, tiny_model.hidden_size)


def test_learnable_tokens_get_gradients_and_vocabulary_is_unchanged(shape_images):
    model = ReMatchModel.tiny(seed=3)
    embeddings = model.adapter.core(model.backbone).get_input_embeddings().weight
    vocab_rows, tokenizer_size = embeddings.shape[0], len(model.adapter.tokenizer)
    model.train()
    batch = model.prepare(mixed_items(shape_images)[:4], role="query")
    output = model.embed(batch, "query")
    assert output.token_states.shape == (4, 16, model.hidden_size)
    target = torch.randn_like(output.embedding)
    (output.embedding * target).sum().backward()
    grad = model.query_tokens.grad
    assert grad is not None and grad.shape == (16, model.hidden_size)
    assert bool((grad.abs().sum(dim=1) > 0).all()), "every one of the K query tokens must receive gradient"
    assert model.document_tokens.grad is None  # not used by a query forward
    assert embeddings.shape[0] == vocab_rows and len(model.adapter.tokenizer) == tokenizer_size
    assert "query_tokens" not in dict(model.backbone.named_parameters())


def test_k0_last_equals_plain_transformers_last_token_pooling(shape_images):
    model = ReMatchModel.tiny(num_tokens=0, pooling="last", seed=0)
    items = [Item(text="a large red circle"), Item(image=shape_images[0], text="Represent the given image."),
             Item(image=shape_images[1]), Item(text="<|image_1|> What colour is the star?", image=shape_images[1])]
    texts = [model.adapter.format_item(item, 0) for item in items]
    images = [item.image for item in items if item.image is not None]
    inputs = model.processor(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt",
                             return_mm_token_type_ids=True)
    with torch.no_grad():
        plain = model.backbone.model(**inputs).last_hidden_state[:, -1]
    ours = model.encode(items, normalize=False)
    np.testing.assert_allclose(ours, plain.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_model_25"])
def test_position_ids_match_transformers_rope_index(request, fixture, shape_images):
    model = request.getfixturevalue(fixture)
    batch = model.prepare(mixed_items(shape_images), role="query")
    expected, _ = model.backbone.model.get_rope_index(
        batch.input_ids, mm_token_type_ids=batch.mm_token_type_ids, image_grid_thw=batch.image_grid_thw,
        attention_mask=batch.attention_mask)
    valid = batch.attention_mask.bool()
    assert torch.equal(batch.position_ids[:, valid], expected[:, valid])


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_save_load_round_trip_gives_identical_embeddings(tmp_path, family, shape_images):
    model = ReMatchModel.tiny(backbone=family, num_tokens=4, seed=5)
    with torch.no_grad():  # make the heads differ from a fresh init, so loading them is tested
        model.query_tokens.add_(0.5)
        model.projector.output_norm.mul_(2)
    items = mixed_items(shape_images)
    model.save_pretrained(tmp_path / "m")
    loaded = ReMatchModel.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config
    np.testing.assert_array_equal(model.encode(items), loaded.encode(items))
    np.testing.assert_array_equal(model.encode(items, role="document"), loaded.encode(items, role="document"))
    assert torch.equal(loaded.projector.output_norm, model.projector.output_norm)


def test_lora_model_saves_adapter_and_reloads_identically(tmp_path, shape_images):
    model = ReMatchModel.tiny(num_tokens=2, seed=2)
    add_trained_looking_lora(model)
    model.save_pretrained(tmp_path / "lora")
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "lora" / "model.safetensors").exists()
    loaded = ReMatchModel.from_pretrained(tmp_path / "lora")
    items = mixed_items(shape_images)[:4]
    np.testing.assert_allclose(model.encode(items), loaded.encode(items), atol=1e-6)


def test_lora_adapter_on_a_different_base_is_refused(tmp_path):
    model = ReMatchModel.tiny(num_tokens=2, seed=2)
    model.enable_lora(r=4, alpha=8)
    model.save_pretrained(tmp_path / "lora")
    config_file = tmp_path / "lora" / "rematch_config.json"
    config_file.write_text(config_file.read_text().replace('"seed": 2', '"seed": 7'))
    with pytest.raises(CheckpointMismatchError, match="different base model"):
        ReMatchModel.from_pretrained(tmp_path / "lora")


def test_loading_with_a_different_k_fails_clearly(tmp_path):
    ReMatchModel.tiny(num_tokens=16).save_pretrained(tmp_path / "k16")
    with pytest.raises(CheckpointMismatchError, match=r"saved with num_tokens=16, but num_tokens=8"):
        ReMatchModel.from_pretrained(tmp_path / "k16", num_tokens=8)
    assert ReMatchModel.from_pretrained(tmp_path / "k16", num_tokens=16).num_tokens == 16


def test_heads_file_that_disagrees_with_the_config_is_refused(tmp_path):
    ReMatchModel.tiny(num_tokens=16).save_pretrained(tmp_path / "k16")
    ReMatchModel.tiny(num_tokens=8).save_pretrained(tmp_path / "k8")
    (tmp_path / "k16" / HEADS_NAME).write_bytes((tmp_path / "k8" / HEADS_NAME).read_bytes())
    with pytest.raises(CheckpointMismatchError, match=r"rematch_heads.safetensors: .* is not the file this model was "
                                                       r"saved with"):
        ReMatchModel.from_pretrained(tmp_path / "k16")
    meta_file = tmp_path / "k16" / "rematch_config.json"  # as saved before checksums were recorded
    meta_file.write_text(json.dumps({k: v for k, v in json.loads(meta_file.read_text()).items() if k != "checksums"}))
    with pytest.raises(CheckpointMismatchError, match=r"query_tokens has shape \(8, 128\).*\(16, 128\)"):
        ReMatchModel.from_pretrained(tmp_path / "k16")


def test_saving_over_an_existing_model_replaces_it_whole(tmp_path):
    ReMatchModel.tiny(num_tokens=16).save_pretrained(tmp_path / "m")
    ReMatchModel.tiny(num_tokens=4).save_pretrained(tmp_path / "m")
    assert ReMatchModel.from_pretrained(tmp_path / "m").num_tokens == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary directories left behind


def test_projector_and_answer_logits(tiny_model):
    embedding = torch.nn.functional.normalize(torch.randn(3, tiny_model.hidden_size), dim=-1)
    soft = tiny_model.project(embedding)
    assert soft.shape == (3, tiny_model.hidden_size)
    table = tiny_model.adapter.core(tiny_model.backbone).get_input_embeddings().weight
    typical = float(table.detach().norm(dim=-1).median())
    np.testing.assert_allclose(soft.norm(dim=-1).detach().numpy(), typical, rtol=1e-4)
    hidden = torch.randn(5, tiny_model.hidden_size)
    logits = tiny_model.answer_logits(hidden)
    full = tiny_model.backbone.lm_head(hidden)
    expected = full[:, [tiny_model.yes_token_id, tiny_model.no_token_id]]
    torch.testing.assert_close(logits, expected)


def test_merge_lora_gives_a_standalone_model_that_encodes_the_same(tmp_path, shape_images):
    from rematch.cli import main

    model = ReMatchModel.tiny(num_tokens=4, seed=6)
    add_trained_looking_lora(model)
    model.save_pretrained(tmp_path / "adapter")
    assert main(["merge-lora", str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    merged = ReMatchModel.from_pretrained(tmp_path / "merged")
    assert not hasattr(merged.backbone, "peft_config")
    items = mixed_items(shape_images)
    for role in ("query", "document"):
        cosine = (model.encode(items, role=role) * merged.encode(items, role=role)).sum(axis=1)
        assert cosine.min() >= 0.9999


def test_prepare_is_safe_from_several_threads(tiny_model, shape_images):
    """Batch prefetching and the matching branch tokenise at the same time during training."""
    from concurrent.futures import ThreadPoolExecutor

    items = mixed_items(shape_images)

    def padded(round_):
        return tiny_model.prepare(items[round_ % 3:], role="query").input_ids.shape

    def unpadded(round_):
        return len(tiny_model.adapter.tokenize_blocks(["Query: a", "Document: " + "b " * (round_ % 7)], []).input_ids)

    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(padded if i % 2 else unpadded, i) for i in range(80)]
        results = [f.result() for f in futures]
    assert len(results) == 80


def test_learnable_tokens_start_from_learned_vocabulary_rows_only():
    """Not from special/added tokens, nor from the padding rows past the tokenizer's vocabulary."""
    model = ReMatchModel.tiny(num_tokens=64, seed=3)
    tokenizer = model.adapter.tokenizer
    table = model.adapter.core(model.backbone).get_input_embeddings().weight.detach()
    assert table.shape[0] > tokenizer.vocab_size  # the tiny backbone pads its table, as Qwen2-VL does
    bad = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    bad |= set(range(tokenizer.vocab_size, table.shape[0]))
    for tokens in (model.query_tokens, model.document_tokens):
        ids = [int((table - row).abs().sum(dim=1).argmin()) for row in tokens.detach()]
        assert all(torch.equal(table[i], row) for i, row in zip(ids, tokens.detach()))
        assert len(set(ids)) == 64 and not set(ids) & bad


def test_the_fingerprint_sees_a_change_in_a_single_weight_and_is_cached_until_one():
    model = ReMatchModel.tiny(num_tokens=2, seed=4)
    first = model.fingerprint()
    assert model.fingerprint() == first
    table = model.adapter.core(model.backbone).get_input_embeddings().weight
    original = table[17, 3].item()
    with torch.no_grad():
        table[17, 3] += 1e-3  # one value of one embedding row: a strided sample missed such edits
    changed = model.fingerprint()
    assert changed != first
    with torch.no_grad():
        table[17, 3] = original
    assert model.fingerprint() == first  # the same bytes again
    with torch.no_grad():
        model.query_tokens.copy_(model.query_tokens.flip(0))
    assert model.fingerprint() not in (first, changed)


def test_the_encode_progress_bar_names_the_role_in_plain_english(capsys):
    model = ReMatchModel.tiny(num_tokens=2)
    model.encode(["a red circle"], role="query", show_progress=True)
    model.encode(["a blue star"], role="document", show_progress=True)
    err = capsys.readouterr().err
    assert "encode queries" in err and "encode documents" in err and "querys" not in err
