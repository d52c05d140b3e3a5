"""The main job on the built-in default.

For now a short real pipeline: build a tiny offline ReMatch model, embed a few built-in
shape scenes and their captions, and print the caption-to-image similarity table. It
grows into the full train / evaluate / ablate demo.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from rematch.data.synthetic import Scene, ShapeObject, caption, render

DEMO_SCENES = (
    Scene((ShapeObject("red", "circle", "large", 0.5, 0.5),)),
    Scene((ShapeObject("blue", "star", "small", 0.3, 0.5), ShapeObject("green", "square", "large", 0.7, 0.5))),
    Scene((ShapeObject("yellow", "triangle", "small", 0.5, 0.25), ShapeObject("purple", "circle", "large", 0.5, 0.7))),
    Scene((ShapeObject("orange", "square", "large", 0.5, 0.5),)),
)


def run_quick_pipeline(out: Path | None = None) -> np.ndarray:
    """Embed built-in captions (queries) and images (documents); print and return their similarities."""
    from rematch import ReMatchModel

    start = time.perf_counter()
    model = ReMatchModel.tiny(size="tiny", backbone="qwen2_vl", k=16, seed=0)
    captions = [caption(scene) for scene in DEMO_SCENES]
    images = [render(scene) for scene in DEMO_SCENES]
    queries = model.encode([{"text": text, "instruction": "Find me an everyday image that matches the given caption:"}
                            for text in captions], role="query")
    documents = model.encode([{"image": image, "text": "Represent the given image."} for image in images],
                             role="document")
    similarity = queries @ documents.T
    print(f"untrained tiny ReMatch model (K={model.num_tokens}, {model.hidden_size}-d embeddings)")
    print("cosine similarity, captions (rows) x images (columns):")
    width = max(len(text) for text in captions)
    print(" " * width + "".join(f"  img{j}" for j in range(len(images))))
    for text, row in zip(captions, similarity):
        print(text.ljust(width) + "".join(f" {value:+.2f}" for value in row))
    print(f"done in {time.perf_counter() - start:.1f}s (an untrained model: the table shows the pipeline, "
          "not retrieval quality)")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        np.save(out / "similarity.npy", similarity)
        model.save_pretrained(out / "model")
    return similarity
