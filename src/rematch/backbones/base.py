"""The contract between ReMatchModel and one family of multimodal LLMs.

ReMatchModel never touches a tokenizer, a chat template or a vision tower directly: it
asks an adapter to turn items into a padded batch (:meth:`BackboneAdapter.prepare`), to
embed that batch (:meth:`input_embeddings`), and to run the language model on embeddings
it may have edited (:meth:`language_model`). Supporting another family (Qwen3-VL, say)
means writing one more adapter, not touching the model, the losses or the trainer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields
from typing import Sequence

import torch
from torch import nn

from rematch.config import ModelConfig
from rematch.data.items import Item

#: ``mm_token_type_ids`` values (transformers 5's numbering).
TEXT, IMAGE, VIDEO = 0, 1, 2


@dataclass
class EncoderBatch:
    """A left-padded batch of items, ready for the backbone.

    Left padding puts every sequence's last token (and its K learnable slots) at the same
    final positions, so pooling is a slice and padding cannot change a row's result.
    """

    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L), 1 = real token
    position_ids: torch.Tensor  # (3, B, L) M-RoPE ids (time, height, width)
    mm_token_type_ids: torch.Tensor  # (B, L): 0 text, 1 image token, 2 video token (as transformers 5)
    num_tokens: int  # K learnable-token slots at the end of every row
    pixel_values: torch.Tensor | None = None  # (patches, C*T*P*P), all images of the batch
    image_grid_thw: torch.Tensor | None = None  # (images, 3)
    image_features: torch.Tensor | None = None
    """(image tokens, H) the vision tower's merged outputs for these images, computed ahead
    (:mod:`rematch.training.vision_cache`) when the tower is frozen; None: run the tower."""
    pixel_values_videos: torch.Tensor | None = None  # (patches, C*T*P*P), all videos of the batch
    video_grid_thw: torch.Tensor | None = None  # (videos, 3): temporal patches, patch rows, patch columns
    video_features: torch.Tensor | None = None
    """(video tokens, H) the tower's outputs for these videos, computed ahead like ``image_features``."""
    second_per_grid_ts: list[float] | None = None
    """Per video: the seconds one temporal patch spans (Qwen2.5-VL spaces its temporal position
    ids by it). The position ids already use it; kept so the matching branch can number the
    same videos in its own sequences. A list, not a tensor: a cast to bf16 must not round it."""
    video_timestamps: list[list[float]] | None = None
    """Per video: the seconds of each sampled frame (Qwen3-VL writes them into the text, so the
    matching branch needs them to write the same videos again)."""

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, start: int, stop: int) -> "EncoderBatch":
        """Rows ``start:stop`` as a batch of their own (their images and videos only, shared left
        padding trimmed).

        Each row holds at most one visual input (an image or a video), in row order, which is
        what lets GradCache cut a batch into chunks without re-processing anything.
        """
        pixel_values, image_grid_thw, image_features = self._visual_rows(
            IMAGE, start, stop, self.pixel_values, self.image_grid_thw, self.image_features)
        pixel_values_videos, video_grid_thw, video_features = self._visual_rows(
            VIDEO, start, stop, self.pixel_values_videos, self.video_grid_thw, self.video_features)
        seconds = timestamps = None
        has_video = (self.mm_token_type_ids == VIDEO).any(dim=1).tolist()
        first_video, last_video = sum(has_video[:start]), sum(has_video[:stop])
        if self.second_per_grid_ts is not None and video_grid_thw is not None:
            seconds = self.second_per_grid_ts[first_video:last_video]
        if self.video_timestamps is not None and video_grid_thw is not None:
            timestamps = self.video_timestamps[first_video:last_video]
        mask = self.attention_mask[start:stop]
        used = mask.bool().any(dim=0).nonzero()
        left = int(used[0]) if len(used) else 0
        return EncoderBatch(
            input_ids=self.input_ids[start:stop, left:],
            attention_mask=mask[:, left:],
            position_ids=self.position_ids[:, start:stop, left:],
            mm_token_type_ids=self.mm_token_type_ids[start:stop, left:],
            num_tokens=self.num_tokens,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            image_features=image_features,
            pixel_values_videos=pixel_values_videos,
            video_grid_thw=video_grid_thw,
            video_features=video_features,
            second_per_grid_ts=seconds,
            video_timestamps=timestamps,
        )

    def _visual_rows(self, kind: int, start: int, stop: int, pixels: torch.Tensor | None, grids: torch.Tensor | None,
                     features: torch.Tensor | None) -> tuple:
        """The patches, grids and precomputed features of the ``kind`` inputs of rows ``start:stop``."""
        is_kind = self.mm_token_type_ids == kind
        has = is_kind.any(dim=1).tolist()
        first, last = sum(has[:start]), sum(has[:stop])
        kept_pixels = kept_grids = kept_features = None
        if features is not None:
            tokens = is_kind.sum(dim=1).tolist()
            begin, end = sum(tokens[:start]), sum(tokens[:stop])
            kept_features = features[begin:end] if end > begin else None
        if grids is not None and last > first:
            patches = grids.prod(dim=1).tolist()
            begin, end = sum(patches[:first]), sum(patches[:last])
            kept_pixels, kept_grids = pixels[begin:end], grids[first:last]
        return kept_pixels, kept_grids, kept_features

    def video_inputs(self) -> dict:
        """The video keyword arguments of :meth:`BackboneAdapter.embed_inputs` (none for a batch
        without videos, so a family without a video path is never asked about them)."""
        if self.pixel_values_videos is None and self.video_features is None:
            return {}
        return {"pixel_values_videos": self.pixel_values_videos, "video_grid_thw": self.video_grid_thw,
                "video_features": self.video_features}

    def image_token_counts(self) -> list[int]:
        """Image tokens per image, in image order (each row holds at most one visual input)."""
        counts = (self.mm_token_type_ids == IMAGE).sum(dim=1).tolist()
        return [int(count) for count in counts if count]

    def video_token_counts(self) -> list[int]:
        """Video tokens per video, in video order."""
        counts = (self.mm_token_type_ids == VIDEO).sum(dim=1).tolist()
        return [int(count) for count in counts if count]

    def visual_kinds(self) -> list[int]:
        """Per row: :data:`IMAGE`, :data:`VIDEO`, or :data:`TEXT` for a row without a visual input."""
        types = self.mm_token_type_ids
        return [VIDEO if video else IMAGE if image else TEXT
                for image, video in zip((types == IMAGE).any(dim=1).tolist(), (types == VIDEO).any(dim=1).tolist())]

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
class DeepStack:
    """Vision features a family adds inside its language model, not with the input embeddings.

    Qwen3-VL's DeepStack adds, after each of the first ``len(layers)`` decoder layers, one
    more vision-tower output to the hidden states at the visual positions; a forward that
    carries only the input embeddings would be another model. ``layers[i]`` holds (visual
    tokens, H) rows in the row-major order of ``visual_mask``'s True entries.
    """

    visual_mask: torch.Tensor  # (B, L) bool, True at image tokens
    layers: tuple[torch.Tensor, ...]

    def packed(self, keep: torch.Tensor) -> "DeepStack":
        """The features of the tokens ``keep`` (B, L) selects, laid out as one packed row (1, T)."""
        kept_visual = keep[self.visual_mask]
        return DeepStack(self.visual_mask[keep].unsqueeze(0), tuple(layer[kept_visual] for layer in self.layers))


@dataclass
class TokenizedBlocks:
    """Separately tokenised text blocks and the processed images they mention."""

    input_ids: list[list[int]]
    token_types: list[list[int]]  # 0 text, 1 image token, 2 video token
    image_grids: list[list[int]]  # (t, h, w) per image, in order
    pixel_values: torch.Tensor | None  # all images' patches, in order
    patches_per_image: list[int]
    video_grids: list[list[int]] = field(default_factory=list)  # (t, h, w) per video, in order
    pixel_values_videos: torch.Tensor | None = None  # all videos' patches, in order
    patches_per_video: list[int] = field(default_factory=list)
    video_seconds: list[float] = field(default_factory=list)  # per video: seconds per temporal patch
    video_timestamps: list[list[float]] = field(default_factory=list)  # per video: each frame's seconds


class BackboneAdapter(ABC):
    """Turns items into backbone inputs and runs the pieces of one MLLM family."""

    #: ``config.model_type`` values this adapter serves.
    model_types: tuple[str, ...] = ()
    #: Image sides the vision tower takes are multiples of this (patch size x merge size).
    image_factor: int

    def __init__(self, processor, config: ModelConfig):
        self.processor = processor
        self.config = config

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    # ----------------------------------------------------------------- data side (CPU)

    @abstractmethod
    def prepare(self, items: Sequence[Item], num_tokens: int, where: str = "item",
                indices: Sequence[int] | None = None) -> EncoderBatch:
        """Build a left-padded batch; ``num_tokens`` placeholder tokens end every row.

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
    def tokenize_blocks(self, texts: Sequence[str], images: Sequence, videos: Sequence = ()) -> "TokenizedBlocks":
        """Tokenise texts with the given images and videos (:class:`~rematch.data.video.VideoFrames`,
        sized for the tower), each in order of its marks, unpadded."""

    @abstractmethod
    def tokenize_blocks_with_grids(self, texts: Sequence[str], image_grids: Sequence[Sequence[int]],
                                   video_grids: Sequence[Sequence[int]] = (),
                                   video_timestamps: Sequence[Sequence[float]] = ()) -> "TokenizedBlocks":
        """Tokenise texts whose images and videos are already processed (``image_grids`` /
        ``video_grids``, in order of their marks; ``video_timestamps``: each video's frame
        seconds, for families that write them in the text): the same ids as
        :meth:`tokenize_blocks`, without touching a pixel."""

    @abstractmethod
    def block_positions(self, token_types: Sequence[int], image_grids: Sequence[Sequence[int]],
                        start: int, video_grids: Sequence[Sequence[int]] = (),
                        video_seconds: Sequence[float] = ()) -> tuple[torch.Tensor, int]:
        """(3, n) position ids of one block starting at ``start``, and the next free position.
        ``video_seconds``: per video, the seconds one temporal patch spans."""

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

    def video_features(self, backbone: nn.Module, pixel_values_videos: torch.Tensor,
                       video_grid_thw: torch.Tensor) -> torch.Tensor:
        """Encode videos: the vision tower's merged outputs of all videos, concatenated (video tokens, H)."""
        raise NotImplementedError(f"{type(self).__name__} has no video path")

    def load_video(self, source, where: str):
        """A video sampled (``config.video_fps`` / ``video_max_frames``) and sized for this family's
        tower: a :class:`~rematch.data.video.VideoFrames`."""
        raise NotImplementedError(f"{type(self).__name__} has no video path")

    def bind_backbone(self, backbone_config) -> None:
        """Read what the data side needs from the backbone's own (transformers) config.

        The adapter is built from the processor and the ReMatch config, but some numbering
        lives only in the model config (Qwen2.5-VL's ``tokens_per_second``, which spaces a
        video's temporal position ids). ReMatchModel calls this once with the backbone's config.
        """

    @abstractmethod
    def input_embeddings(self, backbone: nn.Module, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                         image_grid_thw: torch.Tensor | None = None,
                         image_features: torch.Tensor | None = None,
                         pixel_values_videos: torch.Tensor | None = None,
                         video_grid_thw: torch.Tensor | None = None,
                         video_features: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with the vision tower's outputs placed at image and video tokens: (B, L, H).

        ``image_features`` / ``video_features`` (from :meth:`image_features` / :meth:`video_features`,
        computed earlier) replace running the tower on the pixels: the forward with precomputed features."""

    def embed_inputs(self, backbone: nn.Module, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                     image_grid_thw: torch.Tensor | None = None, image_features: torch.Tensor | None = None,
                     **visual_inputs) -> tuple[torch.Tensor, DeepStack | None]:
        """:meth:`input_embeddings` and the vision features the language model adds later
        (:class:`DeepStack`; None for families without them). Pass the second to
        :meth:`language_model` / :meth:`packed_language_model`."""
        return self.input_embeddings(backbone, input_ids, pixel_values, image_grid_thw,
                                     image_features=image_features, **visual_inputs), None

    @abstractmethod
    def language_model(self, backbone: nn.Module, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                       position_ids: torch.Tensor, deepstack: DeepStack | None = None) -> torch.Tensor:
        """Final-layer (normed) hidden states (B, L, H). ``attention_mask`` is 2-D or a 4-D boolean mask."""

    @abstractmethod
    def packed_language_model(self, backbone: nn.Module, inputs_embeds: torch.Tensor, position_ids: torch.Tensor,
                              lengths: torch.Tensor, deepstack: DeepStack | None = None) -> torch.Tensor:
        """Final states (1, T, H) of ``len(lengths)`` sequences packed into one row, each attending
        only to itself (the padding-free embedding forward)."""

    @abstractmethod
    def load_image(self, source, where: str):
        """An image opened and resized to the sides this family's vision tower takes (PIL)."""

    @abstractmethod
    def output_rows(self, backbone: nn.Module, token_ids: Sequence[int]) -> torch.Tensor:
        """The LM-head rows of ``token_ids``: (len(token_ids), H). Logits for just these tokens,
        without materialising the full vocabulary, are ``hidden @ rows.T``."""

    @abstractmethod
    def text_embeddings(self, backbone: nn.Module, token_ids: torch.Tensor) -> torch.Tensor:
        """Embedding lookup of plain token ids."""
