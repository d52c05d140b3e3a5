"""A training step's shared work done once: frozen-tower image features, already-processed images.

Every comparison is the new path against the old one on the same tiny real model and
batch: loss terms and gradients must agree to 1e-4 relative; the vision tower's calls
are counted with a forward hook on the real tower.
"""

from __future__ import annotations

import pytest
import torch
from tests.support.steps import assert_same, run_step

from rematch import ReMatchModel
from rematch.config import LossConfig
from rematch.training.collate import TrainCollator
from rematch.data.mmeb import open_train_source
from rematch.world.tasks import write_shapes_dataset
from rematch.matching import raw_views, training_views
from rematch.training.step import ReMatchTrainingModule
from rematch.training.vision_cache import vision_tower_frozen, with_image_features


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    return write_shapes_dataset(tmp_path_factory.mktemp("shapes"), train_rows=40, eval_queries=0, seed=3,
                                image_size=56)


@pytest.fixture(scope="module")
def lora_model():
    model = ReMatchModel.tiny(num_tokens=4, seed=0, max_pixels=56 * 56)
    model.enable_lora(r=4, alpha=8, dropout=0.0)
    return model


def tower(model):
    return model.adapter.core(model.backbone).visual


class TowerCalls:
    """Counts forward calls of the real vision tower (a hook, removed on exit)."""

    def __init__(self, model):
        self.module = tower(model)
        self.count = 0

    def __enter__(self):
        self.handle = self.module.register_forward_hook(self._seen)
        return self

    def _seen(self, *_):
        self.count += 1

    def __exit__(self, *_):
        self.handle.remove()


@pytest.mark.parametrize("grad_cache_chunk", [None, 3])
def test_frozen_tower_runs_once_per_step_with_the_same_loss_and_gradients(shapes_root, lora_model,
                                                                          grad_cache_chunk):
    model = lora_model
    assert vision_tower_frozen(model)
    batch = TrainCollator(model, matching=True)(open_train_source(str(shapes_root), seed=0).take(6))
    assert batch.negatives is not None and batch.queries.pixel_values is not None
    loss = LossConfig(matching=0.1, matching_samples=3)
    old = ReMatchTrainingModule(model, loss, seed=0, reuse_image_features=False)
    new = ReMatchTrainingModule(model, loss, seed=0)
    with TowerCalls(model) as old_calls:
        old_terms, old_grads = run_step(old, batch, grad_cache_chunk)
    with TowerCalls(model) as new_calls:
        new_terms, new_grads = run_step(new, batch, grad_cache_chunk)
    assert new_calls.count == 1
    assert old_calls.count > 3  # every embedding pass (and the matching forward) ran the tower
    assert "matching" in new_terms
    assert_same(old_terms, old_grads, new_terms, new_grads)


def test_a_trainable_tower_is_not_cached(shapes_root):
    model = ReMatchModel.tiny(num_tokens=2, seed=1, max_pixels=56 * 56)  # full fine-tuning: the tower trains
    assert not vision_tower_frozen(model)
    batch = TrainCollator(model)(open_train_source(str(shapes_root), seed=0).take(4))
    assert with_image_features(model, batch) is batch


def test_cached_features_equal_the_towers_output_row_by_row(shapes_root, lora_model):
    batch = TrainCollator(lora_model)(open_train_source(str(shapes_root), seed=2).take(6))
    cached = with_image_features(lora_model, batch)
    assert batch.image_features is None and cached.image_features is not None  # the input is not modified
    with torch.no_grad():
        for side in (cached.queries, cached.positives, cached.negatives):
            for start in range(len(side)):
                row = side.rows(start, start + 1)
                if row.pixel_values is None:
                    assert row.image_features is None or row.image_features.numel() == 0
                    continue
                expected = lora_model.adapter.image_features(lora_model.backbone, row.pixel_values,
                                                             row.image_grid_thw)
                torch.testing.assert_close(row.image_features, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("with_negatives", [True, False])
def test_matching_from_already_processed_images_gives_the_same_loss(shapes_root, with_negatives, monkeypatch):
    """Own hard negatives and in-batch negatives (with_negatives=False) alike."""
    model = ReMatchModel.tiny(num_tokens=4, seed=0, max_pixels=56 * 56)
    examples = open_train_source(str(shapes_root), seed=5).take(6)
    plain_batch = TrainCollator(model, with_negatives=with_negatives)(examples)
    threaded_batch = TrainCollator(model, with_negatives=with_negatives, matching=True)(examples)
    assert threaded_batch.matching_views is not None and plain_batch.matching_views is None
    loss = LossConfig(matching=1.0, hard_negatives=with_negatives)
    old = ReMatchTrainingModule(model, loss, seed=0, reuse_processed_images=False)
    new = ReMatchTrainingModule(model, loss, seed=0)
    old_terms, old_grads = run_step(old, plain_batch, None)

    import rematch.backbones.qwen_vl as qwen_vl  # matching loads images through the adapter (load_image)

    loads = []
    original = qwen_vl.load_image_for_model
    monkeypatch.setattr(qwen_vl, "load_image_for_model", lambda *a, **k: loads.append(a) or original(*a, **k))
    for batch in (threaded_batch, plain_batch):  # views from the collator's threads, or made in the step
        new_terms, new_grads = run_step(new, batch, None)
        assert new_terms["matching"] > 0
        assert_same(old_terms, old_grads, new_terms, new_grads)
    assert loads == []  # no image was decoded again for matching


def test_views_tokenise_like_the_processor_with_images(shapes_root, tiny_model):
    batch = TrainCollator(tiny_model)(open_train_source(str(shapes_root), seed=4).take(5))
    views = training_views(tiny_model.adapter, batch.query_items, batch.queries, batch.positive_items,
                           batch.positives, batch.negative_items, batch.negatives, batch.negative_owner)
    from rematch.data.images import load_image_for_model
    from rematch.matching import DOCUMENT_HEADER

    config = tiny_model.config
    for item, view in zip(batch.positive_items, views.positives):
        images = ([load_image_for_model(item.image, config.min_pixels, config.max_pixels)]
                  if item.image is not None else [])
        tokens = tiny_model.adapter.tokenize_blocks([DOCUMENT_HEADER + tiny_model.adapter.content_text(item)], images)
        assert view.ids == tokens.input_ids[0] and view.types == tokens.token_types[0]
        if images:
            torch.testing.assert_close(view.image.pixels, tokens.pixel_values, rtol=0, atol=0)
            assert view.image.grid == tokens.image_grids[0]
    with pytest.raises(ValueError, match="positive 0"):
        raw_views(tiny_model.adapter, batch.positive_items[:1], DOCUMENT_HEADER,
                  [None if batch.positive_items[0].image is not None else views.queries[0].image],
                  ["positive 0"])


def test_pooling_is_float32_in_bfloat16():
    model = ReMatchModel.tiny(num_tokens=4, seed=0, max_pixels=56 * 56, dtype="bfloat16")
    batch = model.prepare(["a red circle", "two blue squares"], role="query")
    with torch.no_grad():
        output = model.embed(batch, "query")
    assert output.token_states.dtype == torch.bfloat16
    assert output.fused.dtype == torch.float32
    torch.testing.assert_close(output.fused, output.token_states.float().mean(dim=1), rtol=0, atol=0)
