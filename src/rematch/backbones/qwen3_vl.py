"""Adapter for Qwen3-VL: the Qwen2-VL adapter plus DeepStack.

What Qwen3-VL shares with Qwen2-VL, and is therefore inherited unchanged: the chat format
(``<|im_start|>`` turns, ``<|vision_start|><|image_pad|>...<|vision_end|>`` for an image),
the image processor (Qwen2-VL's, configured by the checkpoint with 16 px patches merged
2 x 2, so image sides are multiples of 32: :attr:`QwenVLAdapter.image_factor`), and the
M-RoPE position *ids* of images (transformers' ``Qwen3VLModel.get_rope_index`` numbers an
image's tokens exactly as Qwen2-VL does; what is "interleaved" in Qwen3-VL is how the
rotary embedding spreads the three axes over the frequencies, inside the model).

What differs is DeepStack: the vision tower also returns the outputs of a few of its
intermediate layers (merged like the final one), and the language model adds the i-th of
them to its hidden states at the image tokens right after decoder layer i. So the
vision side of a forward is two things, the input embeddings and those per-layer
features (:class:`~rematch.backbones.base.DeepStack`), and every forward here (padded,
padding-free, packed matching) hands both to the language model.

Precomputed tower outputs (:mod:`rematch.training.vision_cache`) keep their one-tensor form:
:meth:`Qwen3VLAdapter.image_features` returns the final and the DeepStack features side by
side, (image tokens, (1 + layers) x H), so slicing them by image token (GradCache's chunks,
the matching sequences' image table) slices all of them together.

The chat wrapper differs in one rule: Qwen3-VL's chat template writes a system turn only when
the conversation has a system message, where Qwen2-VL's writes "You are a helpful assistant."
by default. So an item with an instruction gets its system turn, and an item without one gets
none (:meth:`Qwen3VLAdapter.chat_prefix`); ``model.system_prompt`` gives a system turn only when
set to a prompt of one's own, not at its default (Qwen2-VL's text).

Videos go through Qwen3-VL's own path. Its text says when each frame pair was shot: a
video is written as ``<t seconds><|vision_start|>...<|vision_end|>`` per temporal patch
(two frames; ``t`` is the mean of their times, one decimal), not as Qwen2-VL's one
``<|video_pad|>`` run, so the text depends on the frame times
(:func:`~rematch.backbones.processor.timestamped_video_text`; the frame times are a file's decoded
presentation times, and for frames given as a directory or a list ``index / model.video_fps``,
the rule :mod:`rematch.data.video` writes down; the processor writes it with
:attr:`~rematch.backbones.processor.ImageOnlyQwenVLProcessor.timestamped_videos`). The run
replaces the bare ``<|video_pad|>`` mark, as the original Qwen3-VL processor replaced the
chat template's ``<|vision_start|><|video_pad|><|vision_end|>`` (transformers 5 keeps that
outer pair around the frame groups; it writes this layout when given the bare mark).
Position ids follow: each frame group is numbered like an image of grid (1, h, w) (what
transformers' ``get_rope_index`` does after splitting ``video_grid_thw`` per temporal
patch), since time is in the text. Frames are patched as the image processor patches
images (16 px, mean = std = 0.5, as Qwen3-VL's video processor does), and the tower's
DeepStack features of a video go to the video tokens; with images in the same batch they
are interleaved in token order, as transformers does.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from rematch.backbones.attention import configure_attention
from rematch.backbones.base import DeepStack
from rematch.backbones.processor import VIDEO_TOKEN
from rematch.backbones.qwen_vl import QwenVLAdapter, mrope_positions
from rematch.config import ModelConfig


class Qwen3VLAdapter(QwenVLAdapter):
    """Qwen3-VL: Qwen2-VL's data side with timestamped videos, plus DeepStack on the model side."""

    model_types = ("qwen3_vl",)
    #: The bare mark: the processor writes the whole timestamped run in its place (module docstring).
    video_block = VIDEO_TOKEN
    #: The prompt layout's name in embedding-cache keys (rematch.encoding.cache): vectors cached
    #: while every item got a system turn are not served to this layout.
    prompt_format = "qwen3-template-system-turn"

    def __init__(self, processor, config: ModelConfig):
        super().__init__(processor, config)
        processor.timestamped_videos = True

    def chat_prefix(self, system: str) -> str:
        """Qwen3-VL's template: a system turn only for a real system message (module docstring).
        No system text, or Qwen2-VL's default prompt (ModelConfig's default), writes none."""
        if not system or system == ModelConfig.system_prompt:
            return "<|im_start|>user\n"
        return super().chat_prefix(system)

    def block_positions(self, token_types: Sequence[int], image_grids: Sequence[Sequence[int]],
                        start: int, video_grids: Sequence[Sequence[int]] = (),
                        video_seconds: Sequence[float] = ()) -> tuple[torch.Tensor, int]:
        """M-RoPE ids with every video split into its temporal patches, each numbered like an
        image (the timestamps in the text carry the time; ``video_seconds`` is not used)."""
        groups = [[1, int(h), int(w)] for t, h, w in video_grids for _ in range(int(t))]
        return mrope_positions(token_types, image_grids, self.spatial_merge, start, groups, [1.0] * len(groups))

    def estimate_length(self, item) -> int:
        length = super().estimate_length(item)
        if item.video is not None:  # a timestamp (about 6 tokens) and the two vision marks per frame pair
            frames = self.config.video_max_frames
            if isinstance(item.video, (list, tuple)):
                frames = min(frames, len(item.video))
            length += (frames + 1) // 2 * 8
        return length

    def image_features(self, backbone: nn.Module, pixel_values: torch.Tensor,
                       image_grid_thw: torch.Tensor) -> torch.Tensor:
        """The merged tower outputs and the DeepStack features of all images: (image tokens, (1 + D) x H)."""
        configure_attention(self.causal_lm(backbone), self.config.attn_implementation)
        output = self.core(backbone).get_image_features(pixel_values, image_grid_thw, return_dict=True)
        final = torch.cat(list(output.pooler_output), dim=0)
        stacked = [torch.cat(list(per_image), dim=0) for per_image in output.deepstack_features]
        return torch.cat([final, *stacked], dim=-1)

    def video_features(self, backbone: nn.Module, pixel_values_videos: torch.Tensor,
                       video_grid_thw: torch.Tensor) -> torch.Tensor:
        """The same for videos (the tower runs a video as its temporal patches): (video tokens, (1 + D) x H)."""
        return self.image_features(backbone, pixel_values_videos, video_grid_thw)

    def embed_inputs(self, backbone: nn.Module, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                     image_grid_thw: torch.Tensor | None = None, image_features: torch.Tensor | None = None,
                     pixel_values_videos: torch.Tensor | None = None, video_grid_thw: torch.Tensor | None = None,
                     video_features: torch.Tensor | None = None) -> tuple[torch.Tensor, DeepStack | None]:
        """Token embeddings with the final tower outputs at image and video tokens, and the
        DeepStack features of both, interleaved in token order (one visual mask)."""
        embeds = self.text_embeddings(backbone, input_ids)
        hidden = embeds.shape[-1]
        placed = []  # (token mask, DeepStack layers) per kind present
        for name, token_id, features in self.visual_features(backbone, embeds.device, image_features, pixel_values,
                                                             image_grid_thw, video_features, pixel_values_videos,
                                                             video_grid_thw):
            if features.shape[-1] % hidden:
                raise ValueError(f"{name} features of width {features.shape[-1]} are not whole multiples of the "
                                 f"hidden size {hidden} (final + DeepStack layers side by side)")
            final, *layers = features.to(embeds.dtype).split(hidden, dim=-1)
            mask = input_ids == token_id
            if int(mask.sum()) != final.shape[0]:
                raise ValueError(f"{int(mask.sum())} {name} tokens but {final.shape[0]} {name} features")
            embeds = embeds.masked_scatter(mask.unsqueeze(-1), final)
            placed.append((mask, layers))
        if not placed:
            return embeds, None
        if len({len(layers) for _, layers in placed}) != 1:
            raise ValueError("image and video features carry different numbers of DeepStack layers")
        visual_mask = placed[0][0]
        for mask, _ in placed[1:]:
            visual_mask = visual_mask | mask
        if len(placed) == 1:
            return embeds, DeepStack(visual_mask=visual_mask, layers=tuple(placed[0][1]))
        joint = []
        for depth in range(len(placed[0][1])):
            layer = embeds.new_zeros(int(visual_mask.sum()), hidden)
            for mask, layers in placed:
                layer = layer.index_put((mask[visual_mask].nonzero(as_tuple=True)[0],), layers[depth])
            joint.append(layer)
        return embeds, DeepStack(visual_mask=visual_mask, layers=tuple(joint))

    def input_embeddings(self, backbone: nn.Module, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                         image_grid_thw: torch.Tensor | None = None, image_features: torch.Tensor | None = None,
                         **video_inputs) -> torch.Tensor:
        """Refused with images or videos: the embeddings alone are not Qwen3-VL's input (see :meth:`embed_inputs`)."""
        embeds, deepstack = self.embed_inputs(backbone, input_ids, pixel_values, image_grid_thw, image_features,
                                              **video_inputs)
        if deepstack is not None:
            raise ValueError("Qwen3-VL adds DeepStack vision features inside the language model: use "
                             "embed_inputs() and pass its DeepStack to language_model()")
        return embeds

    def deepstack_inputs(self, deepstack: DeepStack | None) -> dict:
        if deepstack is None:
            return {}
        return {"visual_pos_masks": deepstack.visual_mask, "deepstack_visual_embeds": list(deepstack.layers)}
