"""Attention per part and the padding-free embedding forward, on tiny real models."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from rematch import ReMatchModel
from rematch.backbones.attention import (
    configure_attention,
    mask_for_kernel,
    masked_attention,
    resolve_attention,
    text_attention,
)
from rematch.data.items import Item


def mixed_items(shape_images) -> list[Item]:
    """Short text queries beside image items: a batch that is mostly padding when padded."""
    return [Item(text="red"), Item(image=shape_images[0]), Item(text="a blue star and a large green square " * 3),
            Item(image=shape_images[1], text="<|image_1|> what is left of the square?"), Item(text="yes")]


def test_auto_is_sdpa_without_flash_attention_on_cpu():
    assert resolve_attention("auto", "cpu", torch.bfloat16) == "sdpa"
    assert resolve_attention("eager", "cuda", torch.bfloat16) == "eager"


def test_the_masked_forward_switches_the_text_kernel_and_restores_it(tiny_model):
    causal_lm = tiny_model.adapter.causal_lm(tiny_model.backbone)
    text = causal_lm.config.text_config
    assert configure_attention(causal_lm, tiny_model.config.attn_implementation) == "sdpa"
    text._attn_implementation = "flash_attention_2"  # as on a GPU with flash-attn (no kernel runs here)
    try:
        with masked_attention(causal_lm) as kernel:
            assert kernel == "sdpa" and text_attention(causal_lm) == "sdpa"
        assert text_attention(causal_lm) == "flash_attention_2"
        with pytest.raises(RuntimeError):
            with masked_attention(causal_lm):
                raise RuntimeError("the forward failed")
        assert text_attention(causal_lm) == "flash_attention_2"
    finally:
        text._attn_implementation = "sdpa"
    with pytest.raises(ValueError, match="sdpa or eager"):
        mask_for_kernel(torch.ones(1, 1, 2, 2, dtype=torch.bool), "flash_attention_2", torch.float32)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
def test_padding_free_embeddings_equal_the_padded_ones(shape_images, family, kernel):
    padded = ReMatchModel.tiny(num_tokens=4, backbone=family, seed=1, max_pixels=112 * 112, attn_implementation=kernel)
    packed = ReMatchModel.tiny(num_tokens=4, backbone=family, seed=1, max_pixels=112 * 112, attn_implementation=kernel,
                               padding_free=True)
    assert packed.fingerprint() == padded.fingerprint()  # a layout choice, not another model
    items = mixed_items(shape_images)
    batch = padded.prepare(items, role="document")
    assert (batch.attention_mask == 0).any()  # there is padding to skip
    with torch.no_grad():
        reference = padded.embed(batch, "document")
        result = packed.embed(batch, "document")
    cosine = (reference.embedding * result.embedding).sum(dim=-1)
    assert bool((cosine >= 0.9999).all()), cosine
    torch.testing.assert_close(result.token_states, reference.token_states, rtol=1e-4, atol=1e-4)


def test_padding_free_gradients_equal_the_padded_ones(shape_images):
    padded = ReMatchModel.tiny(num_tokens=4, seed=2, max_pixels=56 * 56)
    packed = ReMatchModel.tiny(num_tokens=4, seed=2, max_pixels=56 * 56, padding_free=True)
    batch = padded.prepare(mixed_items(shape_images), role="query")
    grads = []
    for model in (padded, packed):
        loss = model.embed(batch, "query").embedding.pow(3).sum()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert set(grads[0]) == set(grads[1])
    worst = max(float((grads[0][n] - grads[1][n]).abs().max() / grads[0][n].abs().max().clamp_min(1e-12))
                for n in grads[0])
    assert worst <= 1e-4


def test_padding_free_encode_equals_padded_encode(shape_images):
    model = ReMatchModel.tiny(num_tokens=2, seed=3, max_pixels=56 * 56)
    items = mixed_items(shape_images)
    padded = model.encode(items, batch_size=3)
    model.config = dataclasses.replace(model.config, padding_free=True)
    packed = model.encode(items, batch_size=3)
    assert ((padded * packed).sum(axis=1) >= 0.9999).all()
