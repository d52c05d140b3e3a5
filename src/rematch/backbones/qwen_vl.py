"""Adapter for Qwen2-VL and Qwen2.5-VL (one class: for still images they differ only inside
the vision tower, which transformers runs for us; for videos also in how far apart the
temporal position ids of consecutive frame pairs are, see :meth:`QwenVLAdapter.bind_backbone`).

Chat format of an item (the K learnable slots where the assistant's answer would start)::

    <|im_start|>system\\n{instruction or system prompt}<|im_end|>\\n
    <|im_start|>user\\n<|vision_start|><|image_pad|>...<|vision_end|>{text}<|im_end|>\\n
    <|im_start|>assistant\\n<slot_1>...<slot_K>

A video takes the image block's place as ``<|vision_start|><|video_pad|>...<|vision_end|>``
(one run of T/2 x h x w tokens: the tower merges frames two by two).

The instruction goes into the system turn, as GME and Qwen3-VL-Embedding do; MMEB data,
which writes its instructions inside the text, simply leaves it empty. Position ids are
computed here, not by the model, because the packed matching sequence needs the same
M-RoPE numbering for blocks the model has never seen laid out that way.
"""

from __future__ import annotations

import itertools
import os
import re
import threading
from typing import Iterable, Sequence

import torch
from torch import nn

from rematch.backbones.attention import configure_attention, mask_for_kernel, masked_attention
from rematch.backbones.base import BackboneAdapter, DeepStack, EncoderBatch, TokenizedBlocks
from rematch.config import ModelConfig
from rematch.data.images import load_image_for_model, target_size
from rematch.data.items import IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, Item, ItemError
from rematch.data.video import VideoFrames, load_video_for_model, seconds_per_grid

VISION_BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO_BLOCK = "<|vision_start|><|video_pad|><|vision_end|>"
SLOT_TOKEN = "<|endoftext|>"  # filler id at the K learnable positions (replaced by the learned vectors)
SOFT_TOKEN = "<|vision_pad|>"  # filler id where the matching sequence takes a projected embedding


def mrope_positions(token_types: Iterable[int], image_grids: Iterable[Sequence[int]], spatial_merge: int,
                    start: int = 0, video_grids: Iterable[Sequence[int]] = (),
                    video_intervals: Iterable[float | torch.Tensor] = ()) -> tuple[torch.Tensor, int]:
    """Qwen-VL's 3-D rotary position ids for one unpadded sequence.

    Text tokens advance all three axes together; an image's or video's tokens get (t, row,
    column) ids offset by the current position, after which text resumes at the position
    just past its largest side (transformers 5 numbering: the frame count does not move it).
    A video's temporal ids step by its interval (``video_intervals``, one per video; 1 for
    Qwen2-VL, ``tokens_per_second`` x seconds per temporal patch for Qwen2.5-VL), truncated
    to integers in float32 as transformers does. Returns the (3, n) ids and the next position.
    """
    grids = {1: iter(image_grids), 2: iter(video_grids)}
    intervals = iter(video_intervals)
    chunks = []
    position = start
    for kind, run in itertools.groupby(token_types):
        length = sum(1 for _ in run)
        if kind == 0:
            chunks.append(torch.arange(position, position + length).expand(3, -1))
            position += length
            continue
        name = "image" if kind == 1 else "video"
        grid = next(grids[kind], None)
        if grid is None:
            raise ValueError(f"more {name} token runs than {name} grids")
        t, h, w = (int(v) for v in grid)
        h, w = h // spatial_merge, w // spatial_merge
        if t * h * w != length:
            raise ValueError(f"{name} grid {t}x{h}x{w} does not match {length} {name} tokens")
        times = torch.arange(t)
        if kind == 2:
            interval = next(intervals, 1.0)
            interval = interval if isinstance(interval, torch.Tensor) else torch.tensor(interval, dtype=torch.float32)
            times = (times * interval).long()
        grid_t, grid_h, grid_w = torch.meshgrid(times, torch.arange(h), torch.arange(w), indexing="ij")
        chunks.append(torch.stack([grid_t, grid_h, grid_w]).reshape(3, -1) + position)
        position += max(h, w)
    if not chunks:
        return torch.zeros(3, 0, dtype=torch.long), start
    return torch.cat(chunks, dim=1), position


#: Images reach the processor already resized by :func:`rematch.data.images.load_image_for_model`
#: (Qwen's smart resize, sides multiples of 28). Resizing again is not a no-op in one corner:
#: when shrinking to ``max_pixels`` lands below ``min_pixels`` (e.g. 100 x 70 px with
#: min = max = 3136), a second smart resize grows the image past ``max_pixels`` -- a size plain
#: transformers, which resizes once, never produces.
ALREADY_SIZED = {"do_resize": False}


class QwenVLAdapter(BackboneAdapter):
    """Qwen2-VL / Qwen2.5-VL: chat formatting, image processing, M-RoPE, embedding lookup."""

    model_types = ("qwen2_vl", "qwen2_5_vl")
    #: How an item's text marks its video before the processor expands the mark.
    video_block = VIDEO_BLOCK

    def __init__(self, processor, config: ModelConfig):
        super().__init__(processor, config)
        image_processor = processor.image_processor
        image_processor.size = {"shortest_edge": config.min_pixels, "longest_edge": config.max_pixels}
        self.spatial_merge = int(image_processor.merge_size)
        #: Image sides are multiples of this (patch size x merge size: 28 for Qwen2-VL, 32 for Qwen3-VL).
        self.image_factor = int(image_processor.patch_size) * self.spatial_merge
        self.image_token_id = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.video_token_id = self.tokenizer.convert_tokens_to_ids("<|video_pad|>")
        self.temporal_patch_size = int(image_processor.temporal_patch_size)
        #: Qwen2.5-VL's temporal position step per second of video; None for Qwen2-VL (step 1).
        #: Set by :meth:`bind_backbone` (only the model config holds it).
        self.tokens_per_second: float | None = None
        self._bound = False
        self.slot_token_id = self.tokenizer.convert_tokens_to_ids(SLOT_TOKEN)
        # A fast tokenizer keeps its padding settings in shared mutable state, so two threads
        # (batch prefetching and the matching branch) must not call the processor at once.
        self._processor_lock = threading.Lock()
        specials = sorted(set(self.tokenizer.all_special_tokens) | {t.content for t in
                                                                  self.tokenizer.added_tokens_decoder.values()},
                          key=len, reverse=True)
        self._control_tokens = re.compile("|".join(re.escape(token) for token in specials))

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_processor_lock")
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._processor_lock = threading.Lock()

    # ----------------------------------------------------------------- data side

    def token_id(self, text: str) -> int:
        with self._processor_lock:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"{text!r} is {len(ids)} tokens for this tokenizer; it must be exactly one")
        return ids[0]

    def bind_backbone(self, backbone_config) -> None:
        """Take Qwen2.5-VL's ``vision_config.tokens_per_second`` (Qwen2-VL has none: step 1)."""
        vision = getattr(backbone_config, "vision_config", None)
        value = getattr(vision, "tokens_per_second", None)
        self.tokens_per_second = None if value is None else float(value)
        self._bound = True

    def video_intervals(self, seconds: Sequence[float]) -> list:
        """The temporal position step of each video (see :func:`mrope_positions`)."""
        if not seconds:
            return []
        if not self._bound:
            raise RuntimeError("the adapter is not bound to a backbone (bind_backbone): video position ids "
                               "depend on the model config")
        if self.tokens_per_second is None:
            return [1.0] * len(seconds)
        # transformers multiplies in float32 (tokens_per_second * the second_per_grid_ts tensor)
        return [self.tokens_per_second * torch.tensor(second, dtype=torch.float32) for second in seconds]

    def content_text(self, item: Item) -> str:
        """Item text (truncated) with its image or video marked by one ``<|image_pad|>`` /
        ``<|video_pad|>`` vision block (at its placeholder, else before the text)."""
        text = self._truncate(item.text or "", self.config.max_text_tokens)
        for visual, placeholder, block in ((item.image, IMAGE_PLACEHOLDER, VISION_BLOCK),
                                           (item.video, VIDEO_PLACEHOLDER, self.video_block)):
            if visual is not None:
                text = placeholder.sub(block, text, count=1) if placeholder.search(text) else block + text
        return text

    def chat_prefix(self, system: str) -> str:
        return f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n"

    def answer_prefix(self) -> str:
        return "<|im_end|>\n<|im_start|>assistant\n"

    @property
    def soft_token(self) -> str:
        return SOFT_TOKEN

    def format_item(self, item: Item, num_tokens: int) -> str:
        """The chat-formatted text of one item, image marked by one ``<|image_pad|>``."""
        system = self._truncate(item.instruction if item.instruction else self.config.system_prompt,
                                self.config.max_instruction_tokens)
        return self.chat_prefix(system) + self.content_text(item) + self.answer_prefix() + SLOT_TOKEN * num_tokens

    def check_user_text(self, item: Item, where: str) -> None:
        """Refuse chat control tokens in an item's text or instruction.

        ``<|im_end|>`` in a caption would close the user turn early and ``<|image_pad|>`` would
        ask for an image that is not there: the sequence would no longer be what the model was
        trained on, or the batch would crash deep inside the model. Rejected with the item named.
        """
        for field_name in ("text", "instruction"):
            value = getattr(item, field_name)
            found = self._control_tokens.search(value) if value else None
            if found:
                raise ItemError(f"{where}: field {field_name!r} contains the chat control token {found.group()!r}; "
                                "remove it (rematch adds the chat format itself)")

    def tokenize_blocks(self, texts: Sequence[str], images: Sequence, videos: Sequence[VideoFrames] = ()
                        ) -> TokenizedBlocks:
        videos = list(videos)
        arrays = [video.array() for video in videos] or None
        with self._processor_lock:
            encoded = self.processor(text=list(texts), images=list(images) or None, videos=arrays, padding=False,
                                     return_mm_token_type_ids=True, **ALREADY_SIZED, **_video_metadata(videos))
        grids = [list(map(int, grid)) for grid in encoded.get("image_grid_thw", [])]
        video_grids = [list(map(int, grid)) for grid in encoded.get("video_grid_thw", [])]
        pixel_values = encoded.get("pixel_values")
        pixel_values_videos = encoded.get("pixel_values_videos")
        return TokenizedBlocks(
            input_ids=[list(ids) for ids in encoded["input_ids"]],
            token_types=[list(types) for types in encoded["mm_token_type_ids"]],
            image_grids=grids,
            pixel_values=None if pixel_values is None else torch.as_tensor(pixel_values),
            patches_per_image=[t * h * w for t, h, w in grids],
            video_grids=video_grids,
            pixel_values_videos=None if pixel_values_videos is None else torch.as_tensor(pixel_values_videos),
            patches_per_video=[t * h * w for t, h, w in video_grids],
            video_seconds=[seconds_per_grid(video, self.temporal_patch_size) for video in videos],
            video_timestamps=[list(video.timestamps) for video in videos],
        )

    def tokenize_blocks_with_grids(self, texts: Sequence[str], image_grids: Sequence[Sequence[int]],
                                   video_grids: Sequence[Sequence[int]] = (),
                                   video_timestamps: Sequence[Sequence[float]] = ()) -> TokenizedBlocks:
        """Expand each ``<|image_pad|>`` / ``<|video_pad|>`` to its image's / video's tokens
        (what the processor does when given the pixels) and tokenise without them."""
        merge = self.spatial_merge ** 2
        marks = {self.processor.image_token: ("image", iter(image_grids), len(image_grids)),
                 self.processor.video_token: ("video", iter(video_grids), len(video_grids))}
        pattern = re.compile("|".join(re.escape(token) for token in marks))
        times = iter(video_timestamps)

        def expand(match: re.Match) -> str:
            name, grids, given = marks[match.group()]
            grid = next(grids, None)
            if grid is None:
                raise ValueError(f"more {name} marks in the texts than the {given} {name} grids given")
            if name == "video":
                frame_times = next(times, None)
                metadata = None if frame_times is None else _frame_metadata(frame_times)
                return self.processor.video_text(grid, metadata)
            t, h, w = (int(v) for v in grid)
            return match.group() * (t * h * w // merge)

        expanded = [pattern.sub(expand, text) for text in texts]
        for name, grids, given in marks.values():
            if next(grids, None) is not None:
                raise ValueError(f"{given} {name} grids for fewer {name} marks in the texts")
        with self._processor_lock:  # the processor refuses visual tokens without pixels: tokenise directly
            input_ids = [list(ids) for ids in self.tokenizer(expanded, padding=False)["input_ids"]]
        kinds = {self.image_token_id: 1, self.video_token_id: 2}
        return TokenizedBlocks(input_ids=input_ids,
                               token_types=[[kinds.get(t, 0) for t in ids] for ids in input_ids],
                               image_grids=[list(map(int, g)) for g in image_grids], pixel_values=None,
                               patches_per_image=[int(t) * int(h) * int(w) for t, h, w in image_grids],
                               video_grids=[list(map(int, g)) for g in video_grids],
                               patches_per_video=[int(t) * int(h) * int(w) for t, h, w in video_grids])

    def block_positions(self, token_types: Sequence[int], image_grids: Sequence[Sequence[int]],
                        start: int, video_grids: Sequence[Sequence[int]] = (),
                        video_seconds: Sequence[float] = ()) -> tuple[torch.Tensor, int]:
        return mrope_positions(token_types, image_grids, self.spatial_merge, start, video_grids,
                               self.video_intervals(list(video_seconds)))

    def load_image(self, source, where: str):
        return load_image_for_model(source, self.config.min_pixels, self.config.max_pixels, where=where,
                                    factor=self.image_factor)

    def load_images(self, items: Sequence[Item], where: str, indices: Sequence[int]) -> list:
        return [self.load_image(item.image, f"{where} {index}")
                for index, item in zip(indices, items) if item.image is not None]

    def load_video(self, source, where: str) -> VideoFrames:
        config = self.config
        return load_video_for_model(source, config.video_fps, config.video_max_frames, config.min_pixels,
                                    config.frame_max_pixels, factor=self.image_factor, where=where,
                                    multiple_of=self.temporal_patch_size, sampling=config.video_sampling)

    def load_videos(self, items: Sequence[Item], where: str, indices: Sequence[int]) -> list[VideoFrames]:
        return [self.load_video(item.video, f"{where} {index}")
                for index, item in zip(indices, items) if item.video is not None]

    def prepare(self, items: Sequence[Item], num_tokens: int, where: str = "item",
                indices: Sequence[int] | None = None) -> EncoderBatch:
        indices = list(range(len(items))) if indices is None else list(indices)
        for index, item in zip(indices, items):
            self.check_user_text(item, f"{where} {index}")
        texts = [self.format_item(item, num_tokens) for item in items]
        images = self.load_images(items, where, indices)
        videos = self.load_videos(items, where, indices)
        seconds = [seconds_per_grid(video, self.temporal_patch_size) for video in videos]
        arrays = [video.array() for video in videos] or None
        with self._processor_lock:
            encoded = self.processor(text=texts, images=images or None, videos=arrays, padding=True,
                                     padding_side="left", return_tensors="pt", return_mm_token_type_ids=True,
                                     **ALREADY_SIZED, **_video_metadata(videos))
        input_ids = encoded["input_ids"]
        attention_mask = encoded["attention_mask"]
        lengths = attention_mask.sum(dim=1).tolist()
        for row, length in enumerate(lengths):
            if length > self.config.max_sequence_tokens:
                raise ItemError(f"{where} {indices[row]}: {int(length)} tokens (instruction, text and image or "
                                f"video), over model.max_sequence_tokens={self.config.max_sequence_tokens}; shorten "
                                "the text, lower the image size limit (model.max_pixels; --max-pixels in eval mmeb; "
                                "for videos model.video_max_pixels / video_max_frames) or raise "
                                "model.max_sequence_tokens")
        token_types = encoded["mm_token_type_ids"]
        grids = encoded.get("image_grid_thw")
        if num_tokens and not bool((input_ids[:, -num_tokens:] == self.slot_token_id).all()):
            bad = [indices[row] for row in range(len(items))
                   if not bool((input_ids[row, -num_tokens:] == self.slot_token_id).all())]
            raise ItemError(f"{where} {bad[0] if bad else indices[0]}: the learnable slots did not end the "
                            "sequence (does the text contain chat special tokens?)")
        video_grids = encoded.get("video_grid_thw")
        position_ids = torch.zeros((3, *input_ids.shape), dtype=torch.long)
        grid_rows = iter(grids.tolist() if grids is not None else [])
        video_rows = iter(zip(video_grids.tolist() if video_grids is not None else [], seconds))
        for row, item in enumerate(items):
            valid = attention_mask[row].bool()
            row_grids = [next(grid_rows)] if item.image is not None else []
            row_videos = [next(video_rows)] if item.video is not None else []
            positions, _ = self.block_positions(token_types[row][valid].tolist(), row_grids, 0,
                                                video_grids=[grid for grid, _ in row_videos],
                                                video_seconds=[second for _, second in row_videos])
            position_ids[:, row, valid] = positions
        return EncoderBatch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            mm_token_type_ids=token_types,
            num_tokens=num_tokens,
            pixel_values=encoded.get("pixel_values"),
            image_grid_thw=grids,
            pixel_values_videos=encoded.get("pixel_values_videos"),
            video_grid_thw=video_grids,
            second_per_grid_ts=seconds or None,
            video_timestamps=[list(video.timestamps) for video in videos] or None,
        )

    def estimate_length(self, item: Item) -> int:
        length = len(item.text or "") // 3 + len(item.instruction or self.config.system_prompt) // 3
        if item.image is not None:
            size = _image_size(item.image)
            if size is not None:
                try:
                    height, width = target_size(size[1], size[0], self.config.min_pixels, self.config.max_pixels,
                                                factor=self.image_factor)
                except ValueError:  # an unusable size: loading the image reports it, naming the item
                    return length
                length += height * width // self.image_factor ** 2
        if item.video is not None:  # a guess from the limits alone (the frames are not decoded here)
            frames = self.config.video_max_frames
            if isinstance(item.video, (list, tuple)):
                frames = min(frames, len(item.video))
            length += (frames + 1) // 2 * self.config.frame_max_pixels // self.image_factor ** 2
        return length

    def _truncate(self, text: str, limit: int) -> str:
        if not limit or len(text) <= limit:  # a token is at least one character
            return text
        with self._processor_lock:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            return text if len(ids) <= limit else self.tokenizer.decode(ids[:limit])

    # ----------------------------------------------------------------- model side

    @staticmethod
    def core(backbone: nn.Module) -> nn.Module:
        """The Qwen2VLModel / Qwen2_5_VLModel inside a (possibly PEFT-wrapped) backbone."""
        if hasattr(backbone, "get_base_model"):
            backbone = backbone.get_base_model()
        return backbone.model

    @staticmethod
    def causal_lm(backbone: nn.Module) -> nn.Module:
        return backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone

    def hidden_size(self, backbone: nn.Module) -> int:
        return int(self.causal_lm(backbone).config.text_config.hidden_size)

    def text_embeddings(self, backbone: nn.Module, token_ids: torch.Tensor) -> torch.Tensor:
        return self.core(backbone).get_input_embeddings()(token_ids)

    def image_features(self, backbone: nn.Module, pixel_values: torch.Tensor,
                       image_grid_thw: torch.Tensor) -> torch.Tensor:
        """Merged vision-tower outputs of all images, concatenated: (image tokens, H)."""
        configure_attention(self.causal_lm(backbone), self.config.attn_implementation)
        output = self.core(backbone).get_image_features(pixel_values, image_grid_thw)
        features = getattr(output, "pooler_output", output)
        return torch.cat(list(features), dim=0) if isinstance(features, (list, tuple)) else features

    def video_features(self, backbone: nn.Module, pixel_values_videos: torch.Tensor,
                       video_grid_thw: torch.Tensor) -> torch.Tensor:
        """Merged vision-tower outputs of all videos, concatenated: (video tokens, H). The tower
        runs each video as T/2 temporal patches of two frames (its own video path)."""
        configure_attention(self.causal_lm(backbone), self.config.attn_implementation)
        output = self.core(backbone).get_video_features(pixel_values_videos, video_grid_thw)
        features = getattr(output, "pooler_output", output)
        return torch.cat(list(features), dim=0) if isinstance(features, (list, tuple)) else features

    def input_embeddings(self, backbone: nn.Module, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                         image_grid_thw: torch.Tensor | None = None,
                         image_features: torch.Tensor | None = None,
                         pixel_values_videos: torch.Tensor | None = None,
                         video_grid_thw: torch.Tensor | None = None,
                         video_features: torch.Tensor | None = None) -> torch.Tensor:
        embeds = self.text_embeddings(backbone, input_ids)
        for name, token_id, features in self.visual_features(backbone, embeds.device, image_features, pixel_values,
                                                             image_grid_thw, video_features, pixel_values_videos,
                                                             video_grid_thw):
            mask = input_ids == token_id
            if int(mask.sum()) != features.shape[0]:
                raise ValueError(f"{int(mask.sum())} {name} tokens but {features.shape[0]} {name} features")
            embeds = embeds.masked_scatter(mask.unsqueeze(-1), features.to(embeds.dtype))
        return embeds

    def visual_features(self, backbone: nn.Module, device: torch.device, image_features: torch.Tensor | None,
                        pixel_values: torch.Tensor | None, image_grid_thw: torch.Tensor | None,
                        video_features: torch.Tensor | None, pixel_values_videos: torch.Tensor | None,
                        video_grid_thw: torch.Tensor | None) -> list[tuple[str, int, torch.Tensor]]:
        """``(kind, placeholder token id, features)`` for the images and the videos of a batch, in
        that order, each kind only when present: features computed ahead (the frozen-tower cache)
        are used as they are, otherwise the tower runs on the pixels."""
        present = []
        for name, token_id, features, pixels, grids, encode in (
                ("image", self.image_token_id, image_features, pixel_values, image_grid_thw, self.image_features),
                ("video", self.video_token_id, video_features, pixel_values_videos, video_grid_thw,
                 self.video_features)):
            if features is not None:
                present.append((name, token_id, features.to(device)))
            elif pixels is not None:
                present.append((name, token_id, encode(backbone, pixels, grids)))
        return present

    def deepstack_inputs(self, deepstack: DeepStack | None) -> dict:
        """Keyword arguments that hand ``deepstack`` to the text model (a family hook: Qwen2-VL has none)."""
        if deepstack is not None:
            raise ValueError(f"{type(self).__name__} has no DeepStack vision features to add")
        return {}

    def language_model(self, backbone: nn.Module, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                       position_ids: torch.Tensor, deepstack: DeepStack | None = None) -> torch.Tensor:
        causal_lm = self.causal_lm(backbone)
        configure_attention(causal_lm, self.config.attn_implementation)
        language_model = self.core(backbone).language_model
        extra = self.deepstack_inputs(deepstack)
        if attention_mask.dim() == 2:
            return language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                                  use_cache=False, **extra).last_hidden_state
        if attention_mask.dtype != torch.bool or attention_mask.dim() != 4:
            raise ValueError(f"attention_mask must be 2-D or a 4-D boolean block mask, got {attention_mask.dim()}-D "
                             f"{attention_mask.dtype}")
        with masked_attention(causal_lm) as kernel:
            mask = mask_for_kernel(attention_mask, kernel, inputs_embeds.dtype)
            return language_model(inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=position_ids,
                                  use_cache=False, **extra).last_hidden_state

    def packed_language_model(self, backbone: nn.Module, inputs_embeds: torch.Tensor, position_ids: torch.Tensor,
                              lengths: torch.Tensor, deepstack: DeepStack | None = None) -> torch.Tensor:
        """Final states of several sequences packed into one row (1, T, H), each attending only to itself.

        Under flash-attention the sequences run variable-length (transformers finds their
        boundaries where the text position ids restart at 0; none of the 4-D mask is built);
        otherwise a block-diagonal causal 4-D mask does the same on sdpa/eager.
        """
        causal_lm = self.causal_lm(backbone)
        if configure_attention(causal_lm, self.config.attn_implementation).startswith("flash"):
            text_positions = torch.cat([torch.arange(int(n), device=position_ids.device) for n in lengths.tolist()])
            positions = torch.cat([text_positions.view(1, 1, -1), position_ids], dim=0)  # (4, 1, T)
            return self.core(backbone).language_model(inputs_embeds=inputs_embeds, attention_mask=None,
                                                      position_ids=positions, use_cache=False,
                                                      **self.deepstack_inputs(deepstack)).last_hidden_state
        owner = torch.repeat_interleave(torch.arange(len(lengths), device=inputs_embeds.device),
                                        lengths.to(inputs_embeds.device))
        total = owner.shape[0]
        causal = torch.ones(total, total, dtype=torch.bool, device=inputs_embeds.device).tril()
        mask = (owner[:, None] == owner[None, :]) & causal
        return self.language_model(backbone, inputs_embeds, mask[None, None], position_ids, deepstack)

    def output_rows(self, backbone: nn.Module, token_ids: Sequence[int]) -> torch.Tensor:
        weight = self.causal_lm(backbone).get_output_embeddings().weight
        return weight[torch.as_tensor(list(token_ids), device=weight.device)]


def _frame_metadata(frame_times: Sequence[float]):
    """transformers' ``VideoMetadata`` whose ``timestamps`` are ``frame_times`` (seconds: fps 1)."""
    from transformers.video_utils import VideoMetadata

    return VideoMetadata(total_num_frames=len(frame_times), fps=1.0, frames_indices=list(frame_times))


def _video_metadata(videos: Sequence[VideoFrames]) -> dict:
    """The processor's ``video_metadata`` argument for sampled videos (their frame times), or nothing."""
    return {"video_metadata": [_frame_metadata(video.timestamps) for video in videos]} if videos else {}


def _image_size(image) -> tuple[int, int] | None:
    """(width, height) without decoding pixels; None when the file cannot be read."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.size
    if not os.path.isfile(image):  # never open a FIFO or device (it blocks); loading reports it
        return None
    try:
        with Image.open(image) as handle:
            return handle.size
    except Exception:  # noqa: BLE001 - a guess only: any failure is reported, with the item, when loading
        return None
