"""The packed multi-view matching forward against the pair-by-pair reference, shared by the
matching tests of every family and modality."""

from __future__ import annotations

import torch

from rematch.matching import MatchBatch, build_packed_batch, build_reference_batch, match_logits


def soft_table(model, seed: int = 0) -> torch.Tensor:
    """Six unit-norm soft embeddings (2 samples x 3 views' worth), the same for both forwards."""
    generator = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(6, model.hidden_size, generator=generator), dim=-1)


def assert_packed_equals_reference(model, samples, instruction: str) -> tuple[MatchBatch, MatchBatch]:
    """Build both batches of ``samples``; the packed Yes/No logits must equal the reference's
    within 1e-4 and the labels exactly. Returns (packed, reference) for shape checks."""
    system = model.config.system_prompt
    packed = build_packed_batch(model.adapter, samples, system, instruction)
    reference = build_reference_batch(model.adapter, samples, system, instruction)
    soft = soft_table(model)
    with torch.no_grad():
        difference = (match_logits(model, packed, soft) - match_logits(model, reference, soft)).abs().max()
    assert difference < 1e-4
    torch.testing.assert_close(packed.labels, reference.labels)
    return packed, reference
