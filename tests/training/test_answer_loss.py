"""The generative pre-training loss is exactly transformers' own next-token loss.

``answer_loss`` builds its own inputs (left padding, Qwen M-RoPE ids, image features
scattered into the embeddings, logits only at answer positions). If any of that drifted
from what the model's own ``forward`` does (a shifted label, wrong rotary ids, images not
reaching the language model), the model would be trained on a different problem than the
one it is evaluated on. Comparing with ``Qwen2VLForConditionalGeneration(labels=...)`` on
the same batch catches every one of those at once.
"""

from __future__ import annotations

import torch

from rematch.training.answers import AnswerCollator, answer_loss
from rematch.training.pretrain import PretrainConfig, PretrainModelConfig, build_backbone
from rematch.world.pretrain_corpus import CorpusSpec, make_example


def test_answer_loss_equals_transformers_loss_with_labels():
    config = PretrainConfig(model=PretrainModelConfig(image_size=56))
    backbone, adapter = build_backbone(config)
    collator = AnswerCollator(adapter, config.model.image_size)
    spec = CorpusSpec(task_weights={"colour": 1.0, "caption": 1.0, "verify": 1.0})
    batch = collator([make_example(spec, index) for index in range(4)])
    assert len(set(batch.attention_mask.sum(dim=1).tolist())) > 1, "the batch must exercise left padding"

    labels = torch.full_like(batch.input_ids, -100)
    for row, length in enumerate(batch.answer_lengths):
        labels[row, -length:] = batch.input_ids[row, -length:]
    with torch.no_grad():
        ours = answer_loss(backbone, adapter, batch)["loss"]
        theirs = backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                          pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw,
                          mm_token_type_ids=(batch.input_ids == adapter.image_token_id).int(),
                          labels=labels).loss
        blank = answer_loss(backbone, adapter, batch.__class__(
            batch.input_ids, batch.attention_mask, batch.position_ids, torch.zeros_like(batch.pixel_values),
            batch.image_grid_thw, batch.answer_lengths))["loss"]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert not torch.isclose(ours, blank), "the images must reach the answer"


def test_an_image_placed_last_comes_after_the_question_in_the_sequence():
    """``data.image_position: last``: the vision block follows the question (so, in a causal
    model, the image tokens can attend to it) and the answer still ends the row."""
    config = PretrainConfig(model=PretrainModelConfig(image_size=56))
    backbone, adapter = build_backbone(config)
    collator = AnswerCollator(adapter, config.model.image_size)
    example = make_example(CorpusSpec(task_weights={"colour": 1.0}, image_position="last"), 0)
    batch = collator([example, make_example(CorpusSpec(task_weights={"colour": 1.0}), 0)])
    last, first = (adapter.tokenizer.decode(row[mask.bool()]) for row, mask in zip(batch.input_ids,
                                                                                   batch.attention_mask))
    assert last.index(example.prompt) < last.index("<|vision_start|>") < last.rindex(example.answer)
    assert first.index("<|vision_start|>") < first.index(example.prompt)
    assert last.count("<|image_pad|>") == first.count("<|image_pad|>")  # the same image, moved
    with torch.no_grad():
        assert torch.isfinite(answer_loss(backbone, adapter, batch)["loss"])


FILLS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 230, 30)}


class _Fill:
    """An image that is one solid colour: the answer is in every image token."""

    text = "What colour is the image?"

    def __init__(self, colour: str):
        self.answer = colour

    def image(self, side: int):
        from PIL import Image
        return Image.new("RGB", (side, side), FILLS[self.answer])


def test_a_whole_image_colour_is_learned_through_the_generative_loss():
    """Training on the answer-only loss must move the answer with the image: four equally likely
    colours leave a text-only model at ln 4 on the first answer token; the image takes it to ~0."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = PretrainConfig(model=PretrainModelConfig(image_size=56))
        backbone, adapter = build_backbone(config)
        backbone.train()
        collator = AnswerCollator(adapter, config.model.image_size)
        generator = torch.Generator().manual_seed(0)
        optimizer = torch.optim.AdamW(backbone.parameters(), lr=1e-3, weight_decay=0.0)
        names = list(FILLS)
        for _ in range(80):
            picks = torch.randint(len(names), (16,), generator=generator).tolist()
            loss = answer_loss(backbone, adapter, collator([_Fill(names[i]) for i in picks]))["loss"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        text_only = torch.log(torch.tensor(4.0)).item() / 2  # >= 2 answer tokens, only the first is uncertain
        assert loss.item() < 0.5 * text_only, f"loss {loss.item():.3f}: the image does not reach the answer"
    finally:
        torch.set_num_threads(threads)
