"""A small byte-level BPE tokenizer in Qwen2's style, trained in code with no download.

Tiny offline models need a tokenizer that behaves like Qwen2's (same pre-tokenisation
regex, byte-level alphabet, the same special tokens by name) but with a vocabulary of a
few thousand entries, so the embedding table does not dwarf a 1M-parameter model.
Training takes milliseconds and is deterministic, and the result is saved next to the
model like any Hugging Face tokenizer.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# Qwen2's special tokens, in Qwen2's order (their ids follow the learned vocabulary).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen2's pre-tokenisation pattern: contractions, letter runs, single digits, punctuation.
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_CORPUS = """
You are a helpful assistant. Represent the given image. Represent the given text.
Represent the given image for classification. Represent the given image with the following question:
Find me an everyday image that matches the given caption: Find an image caption describing the given everyday image.
Retrieve an image of the described object. Select the portion of the image that isolates the object.
Represent the given image with the following question. Identify the object in the image.
Does the document match the query? Is the document relevant to the query? Answer only Yes or No.
Yes No Yes No Yes No Yes No query document candidate instruction answer question caption
Query: Document: Answer: Yes. No. yes no
a large red circle. a small blue star left of a large green square. a small yellow triangle above a purple circle.
an orange square below a large blue triangle. a green star right of a small red square.
red green blue yellow purple orange white black gray brown pink
circle square triangle star circles squares triangles stars object objects shape shapes
small large big tiny left right above below of next to on top the a an and or with in is are
What colour is the star? What shape is left of the blue square? How many circles are there?
What color is the circle? What is the shape above the red triangle? How many objects are there?
one two three four five six seven eight nine ten zero 0 1 2 3 4 5 6 7 8 9 10 100 1000
The quick brown fox jumps over the lazy dog. A photo of a cat sitting on a sofa next to a window.
A man riding a bicycle down a city street. Two people walking on the beach at sunset.
A plate of food with vegetables and rice. A group of children playing football in a park.
This is a picture of a dog. Which of these images shows a bird? Where is the person standing?
The image shows a kitchen with a table and chairs. A train arriving at the station in the rain.
news article wikipedia paragraph title passage text image photo picture figure chart table
retrieval classification visual question answering grounding embedding model vector search
"""


def build_offline_tokenizer(vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """Train and return a Qwen2-style byte-level BPE tokenizer on a built-in corpus."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [line for line in _CORPUS.strip().splitlines() if line.strip()]
    tokenizer.train_from_iterator(lines * 4, trainer)
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
        padding_side="left",
    )
    for word in ("Yes", "No"):
        if len(wrapped(word, add_special_tokens=False)["input_ids"]) != 1:
            raise RuntimeError(f"offline tokenizer must encode {word!r} as one token")
    return wrapped
