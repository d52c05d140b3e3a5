"""Image features once per training step when the vision tower is frozen.

With a frozen tower (the LoRA recipes) nothing trains through it, yet a step would run
every image through it three times: GradCache's no-grad pass, its re-forward with a graph,
and the matching forward that shows the same images again. The tower is also most of
the encoding cost on real shapes (about 84% at 448 px on Qwen2.5-VL-3B), so this module
runs it once per step, on all of the step's images together, without a graph, and hands
the result to every pass: each :class:`~rematch.backbones.base.EncoderBatch` gets its
images' features (GradCache's chunks slice them with their rows) and the batch keeps the
per-image table the matching sequences look their images up in.

The gradient is unchanged: with every tower parameter frozen no gradient flows through
the tower, and the tower has no dropout, so its output does not depend on which pass
computes it. A tower with any trainable parameter (full fine-tuning, LoRA inside the
tower) is left alone: each pass runs it with a graph, as before.
"""

from __future__ import annotations

import dataclasses

import torch

from rematch.backbones.base import EncoderBatch


def vision_tower_frozen(model) -> bool:
    """Whether the model has a vision tower and none of its parameters trains."""
    visual = getattr(model.adapter.core(model.backbone), "visual", None)
    if visual is None:
        return False
    parameters = list(visual.parameters())
    return bool(parameters) and not any(p.requires_grad for p in parameters)


def _sides(batch) -> list[tuple[str, EncoderBatch]]:
    """The step's embedding batches in image-table order (see :attr:`rematch.matching.ProcessedImage.source`)."""
    sides = [("queries", batch.queries), ("positives", batch.positives)]
    if batch.negatives is not None:
        sides.append(("negatives", batch.negatives))
    return sides


@torch.no_grad()
def with_image_features(model, batch):
    """``batch`` (a TrainBatch) with its images' tower features computed once, in one tower call.

    Returns the batch unchanged when the tower trains, when there is no image, or when the
    features are there already; otherwise a copy (the input is not modified) whose
    embedding batches carry ``image_features`` and whose ``image_features`` lists each
    image's features in table order.
    """
    if batch.image_features is not None or not vision_tower_frozen(model):
        return batch
    sides = _sides(batch)
    with_images = [side for _, side in sides if side.pixel_values is not None]
    if not with_images:
        return batch
    device = model.device
    pixel_values = torch.cat([side.pixel_values for side in with_images]).to(device)
    grids = torch.cat([side.image_grid_thw for side in with_images]).to(device)
    features = model.adapter.image_features(model.backbone, pixel_values, grids)
    counts = [count for side in with_images for count in side.image_token_counts()]
    if sum(counts) != features.shape[0]:
        raise ValueError(f"{sum(counts)} image tokens in the step's batches but {features.shape[0]} image features")
    per_image = list(torch.split(features, counts))
    replaced, start = {}, 0
    for name, side in sides:
        if side.pixel_values is None:
            continue
        stop = start + len(side.image_token_counts())
        replaced[name] = dataclasses.replace(side, image_features=torch.cat(per_image[start:stop]))
        start = stop
    return dataclasses.replace(batch, image_features=per_image, **replaced)
