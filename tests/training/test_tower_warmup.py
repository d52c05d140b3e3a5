"""The vision-tower warm-up: its targets follow the drawing and the processor's token order,
and a tiny tower learns attributes from them (real tiny models, no mocks)."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image

from rematch.world.scenes import Scene, ShapeObject
from rematch.training.pretrain import PretrainConfig, PretrainObjective, build_backbone
from rematch.training.tower_warmup import AttributeCollator, AttributeHeads, cell_weights
from rematch.world.pretrain_corpus import CorpusSpec, scene_example


def _backbone(family: str, side: int):
    config = PretrainConfig()
    config.model.tiny_family, config.model.image_size = family, side
    return build_backbone(config)


def test_cell_weights_share_out_each_objects_pixels():
    scene = Scene((ShapeObject("red", "square", "large", 0.25, 0.25), ShapeObject("blue", "circle", "small", 0.75, 0.5)))
    weights = cell_weights(scene, 112, (4, 4))
    assert weights.shape == (2, 16) and np.allclose(weights.sum(axis=1), 1.0)
    # the large square is centred on the corner shared by cells (0,0), (0,1), (1,0), (1,1): a quarter in each
    assert np.allclose(weights[0][[0, 1, 4, 5]], 0.25, atol=0.02) and weights[0].sum() == pytest.approx(1.0)
    # the small circle straddles cells (1,2)/(1,3) and (2,2)/(2,3) at x = 0.75 (the border of columns 2 and 3)
    assert set(np.flatnonzero(weights[1])) == {6, 7, 10, 11}
    with pytest.raises(ValueError, match="does not split into 3 x 3"):
        cell_weights(scene, 112, (3, 3))


@pytest.mark.parametrize("family, side", [("qwen2_vl", 112), ("qwen3_vl", 128)])
def test_the_weighted_cells_are_the_tokens_whose_patches_show_the_objects(family, side):
    """Merged token t of an image is patch rows [m*m*t, m*m*(t+1)): the tokens whose pixels are
    not background must be exactly the cells the weights put objects in (the processor's order)."""
    backbone, adapter = _backbone(family, side)
    spec = CorpusSpec(seed=5)
    examples = [scene_example(spec, index) for index in range(6)]
    batch = AttributeCollator(adapter, side)(examples)
    blank = adapter.processor.image_processor(images=[Image.new("RGB", (side, side), (255, 255, 255))],
                                              return_tensors="pt", do_resize=False)["pixel_values"][0]
    group = adapter.spatial_merge ** 2
    drawn = (batch.pixel_values - blank).abs().amax(dim=1) > 1e-4  # per patch row
    drawn_tokens = drawn.view(-1, group).any(dim=1)
    weighted_tokens = (batch.weights > 0).any(dim=0)
    assert drawn_tokens.shape == weighted_tokens.shape
    assert torch.equal(drawn_tokens, weighted_tokens)
    assert batch.labels.shape == (sum(len(e.scene.objects) for e in examples), 3)
    assert torch.allclose(batch.weights.sum(dim=1), torch.ones(len(batch.labels)))


@pytest.mark.slow
def test_a_tiny_tower_learns_object_colours_from_its_tokens():
    torch.manual_seed(0)
    backbone, adapter = _backbone("qwen2_vl", 112)
    hidden = backbone.config.get_text_config().hidden_size
    module = PretrainObjective(backbone, adapter, AttributeHeads(hidden))
    collate = AttributeCollator(adapter, 112)
    spec = CorpusSpec(seed=0)
    held_out = collate([scene_example(CorpusSpec(split="heldout", seed=0), index) for index in range(48)])

    def colour_accuracy() -> float:
        with torch.no_grad():
            return float(module(held_out)["colour_accuracy"])

    before = colour_accuracy()
    tower = list(adapter.core(backbone).visual.parameters()) + list(module.heads.parameters())
    optimizer = torch.optim.AdamW(tower, lr=2e-3, weight_decay=0.0)
    language_model = {name: p.detach().clone() for name, p in backbone.named_parameters() if "visual" not in name}
    for step in range(120):
        loss = module(collate([scene_example(spec, step * 16 + row) for row in range(16)]))["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    after = colour_accuracy()
    assert before < 0.4 and after > 0.8, (before, after)
    # the attribute loss reaches the tower only: the language model got no gradient at all
    assert all(p.grad is None for name, p in backbone.named_parameters() if "visual" not in name)
    assert all(torch.equal(p, language_model[name]) for name, p in backbone.named_parameters() if "visual" not in name)
