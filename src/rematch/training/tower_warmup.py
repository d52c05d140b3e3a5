"""Vision-tower warm-up: every object's colour, shape and size read off the tower's own tokens.

Why (issue 12, measured in ``docs/pretraining.md``): next-token training of a random tiny
Qwen2-VL does not teach its vision tower shape. The answer loss reaches the tower only
through a random language model, and shape, unlike colour, needs the tower to relate
patches. Trained directly, the same tower separates the four shapes of single objects
(99% in 1,100 steps), so the missing piece is the start, not the architecture. The
published models start the same way: their vision towers come pretrained (Qwen2-VL's from a
contrastively trained ViT) before any generative training. This is that step in miniature:
a curriculum phase with ``objective: attributes``.

What it trains: the tower's merged visual tokens (what the language model sees) are pooled
per object, weighted by how many of the object's pixels fall in each token's cell, and a
linear head per attribute classifies the pooled vector. The labels come from the scene
graph and the weights from the object's exact drawing (:func:`rematch.world.scenes.object_mask`),
so nothing is estimated. The heads exist only for this phase and are not saved with the
backbone; the following ``answers`` phases usually keep the tower frozen
(``freeze_tower``), as LLaVA-style training keeps a pretrained ViT fixed while the
language model learns to use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from rematch.world.scenes import ATTRIBUTES, Scene, object_mask


@dataclass
class AttributeBatch:
    """Images and, per object, its cell weights over all merged tokens and its attribute labels."""

    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor
    weights: torch.Tensor  # (objects, merged tokens of the whole batch); each row sums to 1
    labels: torch.Tensor  # (objects, len(ATTRIBUTES)): class index of each attribute

    def to(self, device: torch.device | str) -> "AttributeBatch":
        return AttributeBatch(self.pixel_values.to(device), self.image_grid_thw.to(device),
                              self.weights.to(device), self.labels.to(device))


def cell_weights(scene: Scene, side: int, cells: tuple[int, int], object_scale: float = 1.0) -> np.ndarray:
    """(objects, rows x columns): the share of each object's pixels in each merged token's cell,
    cells in raster order (the order the image processor emits merged tokens)."""
    rows, columns = cells
    if side % rows or side % columns:
        raise ValueError(f"a {side} px image does not split into {rows} x {columns} equal cells")
    weights = []
    for obj in scene.objects:
        mask = np.asarray(object_mask(obj, side, object_scale), dtype=np.float64) / 255.0
        per_cell = mask.reshape(rows, side // rows, columns, side // columns).sum(axis=(1, 3)).reshape(-1)
        total = per_cell.sum()
        if total <= 0:
            raise ValueError(f"object {obj} draws no pixel in a {side} px image")
        weights.append(per_cell / total)
    return np.stack(weights)


class AttributeCollator:
    """Scene examples (:func:`rematch.world.pretrain_corpus.scene_example`) -> :class:`AttributeBatch`,
    through the adapter's image loading and processor, as the answer batches are."""

    def __init__(self, adapter, image_size: int):
        self.adapter = adapter
        self.image_size = image_size

    def __call__(self, examples: Sequence) -> AttributeBatch:
        adapter, side = self.adapter, self.image_size
        images = [adapter.load_image(example.image(side), f"example {index}")
                  for index, example in enumerate(examples)]
        if any(image.size != (side, side) for image in images):
            raise ValueError(f"the image size {side} is not a multiple of the backbone's merged patch side "
                             f"({adapter.image_factor} px): cell weights would not match the tokens")
        with adapter._processor_lock:
            encoded = adapter.processor.image_processor(images=images, return_tensors="pt", do_resize=False)
        grids = encoded["image_grid_thw"]
        blocks, labels = [], []
        for example, grid in zip(examples, grids.tolist()):
            cells = (grid[1] // adapter.spatial_merge, grid[2] // adapter.spatial_merge)
            blocks.append(cell_weights(example.scene, side, cells, example.object_scale))
            labels += [[values.index(getattr(obj, name)) for name, values in ATTRIBUTES.items()]
                       for obj in example.scene.objects]
        weights = np.zeros((sum(len(block) for block in blocks), sum(block.shape[1] for block in blocks)))
        row = column = 0
        for block in blocks:
            weights[row:row + block.shape[0], column:column + block.shape[1]] = block
            row, column = row + block.shape[0], column + block.shape[1]
        return AttributeBatch(encoded["pixel_values"], grids, torch.tensor(weights, dtype=torch.float32),
                              torch.tensor(labels, dtype=torch.long))


class AttributeHeads(nn.Module):
    """One linear classifier per attribute over an object's pooled merged tokens."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.heads = nn.ModuleDict({name: nn.Linear(hidden_size, len(values)) for name, values in ATTRIBUTES.items()})

    def forward(self, objects: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: head(objects) for name, head in self.heads.items()}


def attribute_loss(backbone: nn.Module, adapter, heads: AttributeHeads, batch: AttributeBatch) -> dict[str, torch.Tensor]:
    """The attribute heads' cross-entropies (each a mean over the objects) summed, ``count`` (the
    objects), and each head's accuracy.

    Only the final merged features are pooled (Qwen3-VL's DeepStack features ride along in the
    same rows and are left out): they are the tokens the language model reads first.
    """
    features = adapter.image_features(backbone, batch.pixel_values, batch.image_grid_thw)[:, :heads.hidden_size]
    objects = batch.weights.to(features.dtype) @ features
    terms: dict[str, torch.Tensor] = {}
    total = objects.new_zeros(())
    for column, (name, logits) in enumerate(heads(objects).items()):
        target = batch.labels[:, column]
        total = total + F.cross_entropy(logits.float(), target)
        terms[f"{name}_accuracy"] = (logits.argmax(-1) == target).float().mean().detach()
    return {"loss": total, "count": torch.tensor(float(len(objects)), device=objects.device), **terms}
