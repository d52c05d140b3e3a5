"""The packed multi-view matching forward equals the pair-by-pair reference and leaks nothing."""

from __future__ import annotations

import pytest
import torch

from tests.support.matching import assert_packed_equals_reference, soft_table
from rematch import Item, ReMatchModel
from rematch.world.scenes import Scene, ShapeObject, render
from rematch.matching import (
    MatchSample,
    build_packed_batch,
    document_blocks,
    match_logits,
    view_pairs,
    QUERY_RAW,
    QUERY_SOFT,
)

INSTRUCTION = "Does the document match the query? Answer only Yes or No."


def scene_image(colour: str, shape: str = "circle"):
    return render(Scene((ShapeObject(colour, shape, "large", 0.5, 0.5),)))


def samples(second_doc_colour: str = "blue") -> list[MatchSample]:
    return [
        MatchSample(Item(text="a large red circle", instruction="Find me an everyday image that matches"),
                    (Item(image=scene_image("red")), Item(image=scene_image(second_doc_colour),
                                                          text="Represent the given image.")),
                    (True, False)),
        MatchSample(Item(text="<|image_1|> What colour is the circle?", image=scene_image("green")),
                    (Item(text="purple"), Item(text="green")), (False, True)),
    ]


def logits_of(model, batch, soft):
    with torch.no_grad():
        return match_logits(model, batch, soft)


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_model_25"])
def test_packed_equals_reference_with_images(request, fixture):
    model = request.getfixturevalue(fixture)
    packed, reference = assert_packed_equals_reference(model, samples(), INSTRUCTION)
    assert packed.input_ids.shape[0] == 2 and reference.input_ids.shape[0] == 16
    assert packed.pixel_values is not None and packed.image_grid_thw.shape[0] == 3


def test_labels_follow_the_relevant_document():
    pairs = view_pairs(2)
    assert len(pairs) == 8
    assert pairs[0] == (QUERY_RAW, document_blocks(0)[0]) and pairs[-1] == (QUERY_SOFT, document_blocks(1)[1])
    model = ReMatchModel.tiny(num_tokens=2)
    batch = build_packed_batch(model.adapter, samples(), model.config.system_prompt, INSTRUCTION)
    # sample 0: document 0 relevant -> its 4 pairs say Yes (0); sample 1: document 1 relevant
    assert batch.labels.view(2, 8).tolist() == [[0, 0, 1, 1, 0, 0, 1, 1], [1, 1, 0, 0, 1, 1, 0, 0]]


def test_an_answer_does_not_see_other_pairs_views(tiny_model):
    """Perturb document 1's raw image (same size, other colour) and its soft token: only the
    pairs that contain that view may move."""
    model = tiny_model
    system = model.config.system_prompt
    base = build_packed_batch(model.adapter, samples("blue"), system, INSTRUCTION)
    changed_pixels = build_packed_batch(model.adapter, samples("yellow"), system, INSTRUCTION)
    assert torch.equal(base.input_ids, changed_pixels.input_ids)  # same tokens, other pixels
    assert not torch.equal(base.pixel_values, changed_pixels.pixel_values)
    soft = soft_table(model)
    reference = logits_of(model, base, soft)[0]
    moved = (logits_of(model, changed_pixels, soft)[0] - reference).abs().amax(dim=-1)
    pairs = view_pairs(2)
    raw_doc1 = document_blocks(1)[0]
    for p, (_, doc_view) in enumerate(pairs):
        if doc_view == raw_doc1:
            assert moved[p] > 1e-4, f"pair {p} sees document 1's raw view but did not react"
        else:
            assert moved[p] < 1e-6, f"pair {p} moved although it must not see document 1's raw view"

    soft_changed = soft.clone()
    soft_changed[2] = torch.nn.functional.normalize(torch.randn(model.hidden_size), dim=0)  # sample 0, document 1
    moved = (logits_of(model, base, soft_changed)[0] - reference).abs().amax(dim=-1)
    soft_doc1 = document_blocks(1)[1]
    for p, (_, doc_view) in enumerate(pairs):
        assert (moved[p] > 1e-4) == (doc_view == soft_doc1), f"pair {p}"
    # the second sample lives in another row and is untouched by either change
    torch.testing.assert_close(logits_of(model, base, soft_changed)[1], logits_of(model, base, soft)[1])


def test_eager_and_sdpa_masks_agree(tiny_model):
    batch = build_packed_batch(tiny_model.adapter, samples(), tiny_model.config.system_prompt, INSTRUCTION)
    soft = soft_table(tiny_model)
    sdpa = logits_of(tiny_model, batch, soft)
    eager_model = ReMatchModel.tiny(seed=0, attn_implementation="eager")
    torch.testing.assert_close(logits_of(eager_model, batch, soft), sdpa, atol=1e-5, rtol=1e-5)


def test_matching_gradient_reaches_embeddings_and_projector():
    model = ReMatchModel.tiny(num_tokens=2, seed=1)
    batch = build_packed_batch(model.adapter, samples(), model.config.system_prompt, INSTRUCTION)
    embeddings = soft_table(model).requires_grad_(True)
    logits = match_logits(model, batch, embeddings)
    torch.nn.functional.cross_entropy(logits.reshape(-1, 2), batch.labels).backward()
    assert embeddings.grad is not None and embeddings.grad.abs().sum() > 0
    assert model.projector.mlp[0].weight.grad.abs().sum() > 0


def test_samples_must_have_the_same_number_of_documents(tiny_model):
    uneven = [samples()[0], MatchSample(Item(text="q"), (Item(text="d"),), (True,))]
    with pytest.raises(ValueError, match="same, non-zero number of documents"):
        build_packed_batch(tiny_model.adapter, uneven, "s", INSTRUCTION)



def test_each_answer_starts_right_after_its_own_document_view(tiny_model):
    """A pair's answer must not be numbered after the OTHER document (a label shortcut: the gap
    would tell which slot, hence often which label, the pair is about)."""
    model = tiny_model
    query = Item(text="what colour is the circle?")
    documents = (Item(text="red"), Item(text="a large red circle next to a small blue star " * 3))
    batch = build_packed_batch(model.adapter, [MatchSample(query, documents, (True, False))],
                               model.config.system_prompt, INSTRUCTION)
    answer_length = len(model.adapter.tokenizer(model.adapter.answer_prefix(), add_special_tokens=False)["input_ids"])
    positions = batch.position_ids[:, 0]  # (3, L) of the one packed row
    for p in range(len(view_pairs(2))):
        last = int(batch.answer_cols[p])
        first = last - answer_length + 1
        seen = batch.block_mask[0, last].nonzero().flatten()
        content = seen[seen < first]  # prompt, this pair's query view and document view
        assert int(positions[0, first]) == int(positions[:, content].max()) + 1, f"pair {p}"


def test_a_pairs_logits_do_not_depend_on_the_other_documents_length(tiny_model):
    model = tiny_model
    query, relevant = Item(text="a large red circle"), Item(image=scene_image("red"))
    system, soft = model.config.system_prompt, soft_table(model)[:3]

    def logits(documents):
        sample = MatchSample(query, documents, (True,) + (False,) * (len(documents) - 1))
        return logits_of(model, build_packed_batch(model.adapter, [sample], system, INSTRUCTION),
                         soft[:1 + len(documents)])[0]

    of_document_0 = [p for p, (_, doc_view) in enumerate(view_pairs(2)) if doc_view in document_blocks(0)]
    short = logits((relevant, Item(text="blue")))[of_document_0]
    long = logits((relevant, Item(text="a blue square " * 20)))[of_document_0]
    torch.testing.assert_close(short, long, atol=1e-5, rtol=1e-5)
    # ... and a pair is answered as in reranking, where each candidate is matched on its own
    torch.testing.assert_close(logits((relevant,)), short, atol=1e-5, rtol=1e-5)
