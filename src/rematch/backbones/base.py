"""The contract between ReMatchModel and one family of multimodal LLMs.

ReMatchModel never touches a tokenizer, a chat template or a vision tower directly: it
asks an adapter to turn items into a padded batch (:meth:`BackboneAdapter.prepare`), to
embed that batch (:meth:`input_embeddings`), and to run the language model on embeddings
it may have edited (:meth:`language_model`). Supporting another family (Qwen3-VL, say)
means writing one more adapter, not touching the model, the losses or the trainer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from typing import Sequence

import torch
from torch import nn

from rematch.config import ModelConfig
from rematch.data.items import Item


@dataclass
class EncoderBatch:
    """A left-padded batch of items, ready for the backbone.

    Left padding puts every sequence's last token (and its K learnable slots) at the same
    final positions, so pooling is a slice and padding cannot change a row's result.
    """

    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L), 1 = real token
    position_ids: torch.Tensor  # (3, B, L) M-RoPE ids (time, height, width)
    mm_token_type_ids: torch.Tensor  # (B, L): 0 text, 1 image token
    num_slots: int  # K learnable-token slots at the end of every row
    pixel_values: torch.Tensor | None = None  # (patches, C*T*P*P), all images of the batch
    image_grid_thw: torch.Tensor | None = None  # (images, 3)
    image_features: torch.Tensor | None = None
    """(image tokens, H) the vision tower's merged outputs for these images, computed ahead
    (:mod:`rematch.training.vision_cache`) when the tower is frozen; None: run the tower."""

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, start: int, stop: int) -> "EncoderBatch":
        """Rows ``start:stop`` as a batch of their own (their images only, shared left padding trimmed).

        Each row holds at most one image, in row order, which is what lets GradCache cut a
        batch into chunks without re-processing anything.
        """
        has_image = self.mm_token_type_ids.bool().any(dim=1).tolist()
        first_image, last_image = sum(has_image[:start]), sum(has_image[:stop])
        pixel_values = image_grid_thw = image_features = None
        if self.image_features is not None:
            image_tokens = self.mm_token_type_ids.bool().sum(dim=1).tolist()
            begin, end = sum(image_tokens[:start]), sum(image_tokens[:stop])
            image_features = self.image_features[begin:end] if end > begin else None
        if self.image_grid_thw is not None and last_image > first_image:
            patches = self.image_grid_thw.prod(dim=1).tolist()
            begin, end = sum(patches[:first_image]), sum(patches[:last_image])
            pixel_values = self.pixel_values[begin:end]
            image_grid_thw = self.image_grid_thw[first_image:last_image]
        mask = self.attention_mask[start:stop]
        used = mask.bool().any(dim=0).nonzero()
        left = int(used[0]) if len(used) else 0
        return EncoderBatch(
            input_ids=self.input_ids[start:stop, left:],
            attention_mask=mask[:, left:],
            position_ids=self.position_ids[:, start:stop, left:],
            mm_token_type_ids=self.mm_token_type_ids[start:stop, left:],
            num_slots=self.num_slots,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            image_features=image_features,
        )

    def image_token_counts(self) -> list[int]:
        """Image tokens per image, in image order (each row holds at most one image)."""
        counts = self.mm_token_type_ids.bool().sum(dim=1).tolist()
        return [int(count) for count in counts if count]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None,
           non_blocking: bool = False) -> "EncoderBatch":
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = value.to(device, dtype=dtype if (dtype is not None and value.is_floating_point()) else None,
                                 non_blocking=non_blocking)
            moved[f.name] = value
        return EncoderBatch(**moved)

    def pin_memory(self) -> "EncoderBatch":
        """A copy in page-locked memory, so the copy to a GPU can overlap other work (``non_blocking``)."""
        return EncoderBatch(**{f.name: (value.pin_memory() if isinstance(value, torch.Tensor) else value)
                               for f in fields(self) for value in [getattr(self, f.name)]})


@dataclass
class TokenizedBlocks:
    """Separately tokenised text blocks and the processed images they mention."""

    input_ids: list[list[int]]
    token_types: list[list[int]]  # 0 text, 1 image token
    image_grids: list[list[int]]  # (t, h, w) per image, in order
    pixel_values: torch.Tensor | None  # all images' patches, in order
    patches_per_image: list[int]


class BackboneAdapter(ABC):
    """Turns items into backbone inputs and runs the pieces of one MLLM family."""

    #: ``config.model_type`` values this adapter serves.
    model_types: tuple[str, ...] = ()

    def __init__(self, processor, config: ModelConfig):
        self.processor = processor
        self.config = config

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    # ----------------------------------------------------------------- data side (CPU)

    @abstractmethod
    def prepare(self, items: Sequence[Item], num_slots: int, where: str = "item",
                indices: Sequence[int] | None = None) -> EncoderBatch:
        """Build a left-padded batch; ``num_slots`` placeholder tokens end every row.

        Errors name ``where`` and the item's index in the caller's list (``indices``,
        default: position in this batch).
        """

    # ----------------------------------------------------------------- blocks (matching)
    # The packed matching sequence is assembled from separately tokenised blocks; these
    # give the family's chat pieces and tokenise blocks with their images.

    @abstractmethod
    def check_user_text(self, item: Item, where: str) -> None:
        """Raise :class:`~rematch.data.items.ItemError` naming ``where`` if the item's text or
        instruction holds the family's chat control tokens."""

    @abstractmethod
    def content_text(self, item: Item) -> str:
        """An item's text with its image marked in the family's format (no chat wrapper)."""

    @abstractmethod
    def chat_prefix(self, system: str) -> str:
        """Text that opens a chat up to the start of the user's content."""

    @abstractmethod
    def answer_prefix(self) -> str:
        """Text that closes the user turn and opens the assistant's answer."""

    @property
    @abstractmethod
    def soft_token(self) -> str:
        """A special token whose embedding is replaced by a soft (projected) token."""

    @abstractmethod
    def tokenize_blocks(self, texts: Sequence[str], images: Sequence) -> "TokenizedBlocks":
        """Tokenise texts with the given images (in order of their image marks), unpadded."""

    @abstractmethod
    def tokenize_blocks_with_grids(self, texts: Sequence[str], image_grids: Sequence[Sequence[int]]
                                   ) -> "TokenizedBlocks":
        """Tokenise texts whose images are already processed (``image_grids``, in order of their
        image marks): the same ids as :meth:`tokenize_blocks`, without touching a pixel."""

    @abstractmethod
    def block_positions(self, token_types: Sequence[int], image_grids: Sequence[Sequence[int]],
                        start: int) -> tuple[torch.Tensor, int]:
        """(3, n) position ids of one block starting at ``start``, and the next free position."""

    @abstractmethod
    def estimate_length(self, item: Item) -> int:
        """A cheap guess of an item's token count, used to sort items into tight batches."""

    @abstractmethod
    def token_id(self, text: str) -> int:
        """The id of a word that must be exactly one token (e.g. "Yes")."""

    # ----------------------------------------------------------------- model side

    @abstractmethod
    def hidden_size(self, backbone: nn.Module) -> int:
        """Width of the language model's hidden states (= its input embeddings)."""

    @abstractmethod
    def image_features(self, backbone: nn.Module, pixel_values: torch.Tensor,
                       image_grid_thw: torch.Tensor) -> torch.Tensor:
        """Encode images: the vision tower's merged outputs of all images, concatenated (image tokens, H)."""

    @abstractmethod
    def input_embeddings(self, backbone: nn.Module, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                         image_grid_thw: torch.Tensor | None = None,
                         image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with the vision tower's outputs placed at image tokens: (B, L, H).

        ``image_features`` (from :meth:`image_features`, computed earlier) replaces running the
        tower on ``pixel_values``: the forward with precomputed image features."""

    @abstractmethod
    def language_model(self, backbone: nn.Module, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                       position_ids: torch.Tensor) -> torch.Tensor:
        """Final-layer (normed) hidden states (B, L, H). ``attention_mask`` is 2-D or a 4-D boolean mask."""

    @abstractmethod
    def packed_language_model(self, backbone: nn.Module, inputs_embeds: torch.Tensor, position_ids: torch.Tensor,
                              lengths: torch.Tensor) -> torch.Tensor:
        """Final states (1, T, H) of ``len(lengths)`` sequences packed into one row, each attending
        only to itself (the padding-free embedding forward)."""

    @abstractmethod
    def output_rows(self, backbone: nn.Module, token_ids: Sequence[int]) -> torch.Tensor:
        """The LM-head rows of ``token_ids``: (len(token_ids), H). Logits for just these tokens,
        without materialising the full vocabulary, are ``hidden @ rows.T``."""

    @abstractmethod
    def text_embeddings(self, backbone: nn.Module, token_ids: torch.Tensor) -> torch.Tensor:
        """Embedding lookup of plain token ids."""
