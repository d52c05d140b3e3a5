"""Image features once per training step when the vision tower is frozen.

With a frozen tower (the LoRA recipes) nothing trains through it, yet a step would run
every image through it three times: GradCache's no-grad pass, its re-forward with a graph,
and the matching forward that shows the same images again. The tower is also most of
the encoding cost on real shapes (about 84% at 448 px on Qwen2.5-VL-3B), so this module
runs it once per step, on all of the step's images together, without a graph, and hands
the result to every pass: each :class:`~rematch.backbones.base.EncoderBatch` gets its
images' features (GradCache's chunks slice them with their rows) and the batch keeps the
per-image table the matching sequences look their images up in. Videos are handled the
same way (one more tower call for all of the step's videos); the table holds every visual
input, image or video, in row order, since a row holds at most one.

The gradient is unchanged: with every tower parameter frozen no gradient flows through
the tower, and the tower has no dropout, so its output does not depend on which pass
computes it. A tower with any trainable parameter (full fine-tuning, LoRA inside the
tower) is left alone: each pass runs it with a graph, as before.
"""

from __future__ import annotations

import dataclasses

import torch

from rematch.backbones.base import IMAGE, VIDEO, EncoderBatch


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


def _per_input_features(model, sides: list[EncoderBatch], kind: int) -> list[list[torch.Tensor]]:
    """Per side, the tower's features of each of its images (``kind`` IMAGE) or videos (VIDEO),
    all sides' inputs of that kind in one tower call."""
    if kind == IMAGE:
        pixels = [side.pixel_values for side in sides]
        grids = [side.image_grid_thw for side in sides]
        counts = [side.image_token_counts() for side in sides]
        encode = model.adapter.image_features
    else:
        pixels = [side.pixel_values_videos for side in sides]
        grids = [side.video_grid_thw for side in sides]
        counts = [side.video_token_counts() for side in sides]
        encode = model.adapter.video_features
    present = [i for i, values in enumerate(pixels) if values is not None]
    if not present:
        return [[] for _ in sides]
    device = model.device
    features = encode(model.backbone, torch.cat([pixels[i] for i in present]).to(device),
                      torch.cat([grids[i] for i in present]).to(device))
    flat = [count for i in present for count in counts[i]]
    name = "image" if kind == IMAGE else "video"
    if sum(flat) != features.shape[0]:
        raise ValueError(f"{sum(flat)} {name} tokens in the step's batches but {features.shape[0]} {name} features")
    pieces = iter(torch.split(features, flat))
    return [[next(pieces) for _ in counts[i]] if pixels[i] is not None else [] for i in range(len(sides))]


@torch.no_grad()
def with_image_features(model, batch):
    """``batch`` (a TrainBatch) with its images' and videos' tower features computed once (one
    tower call for the images, one for the videos).

    Returns the batch unchanged when the tower trains, when there is no image or video, or
    when the features are there already; otherwise a copy (the input is not modified) whose
    embedding batches carry ``image_features`` / ``video_features`` and whose
    ``image_features`` lists each visual input's features in table order (row order, sides
    in the order queries, positives, negatives).
    """
    if batch.image_features is not None or not vision_tower_frozen(model):
        return batch
    sides = _sides(batch)
    batches = [side for _, side in sides]
    if all(side.pixel_values is None and side.pixel_values_videos is None for side in batches):
        return batch
    images = _per_input_features(model, batches, IMAGE)
    videos = _per_input_features(model, batches, VIDEO)
    table: list[torch.Tensor] = []
    replaced = {}
    for (name, side), side_images, side_videos in zip(sides, images, videos):
        image_queue, video_queue = iter(side_images), iter(side_videos)
        for kind in side.visual_kinds():
            if kind == IMAGE:
                table.append(next(image_queue))
            elif kind == VIDEO:
                table.append(next(video_queue))
        changes = {}
        if side_images:
            changes["image_features"] = torch.cat(side_images)
        if side_videos:
            changes["video_features"] = torch.cat(side_videos)
        if changes:
            replaced[name] = dataclasses.replace(side, **changes)
    return dataclasses.replace(batch, image_features=table, **replaced)
