"""Adapter for Qwen2-VL and Qwen2.5-VL (one class: for still images they differ only inside
the vision tower, which transformers runs for us).

Chat format of an item (the K learnable slots where the assistant's answer would start)::

    <|im_start|>system\\n{instruction or system prompt}<|im_end|>\\n
    <|im_start|>user\\n<|vision_start|><|image_pad|>...<|vision_end|>{text}<|im_end|>\\n
    <|im_start|>assistant\\n<slot_1>...<slot_K>

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
from rematch.backbones.base import BackboneAdapter, EncoderBatch, TokenizedBlocks
from rematch.config import ModelConfig
from rematch.data.images import load_image_for_model, target_size
from rematch.data.items import IMAGE_PLACEHOLDER, Item, ItemError

VISION_BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"
SLOT_TOKEN = "<|endoftext|>"  # filler id at the K learnable positions (replaced by the learned vectors)
SOFT_TOKEN = "<|vision_pad|>"  # filler id where the matching sequence takes a projected embedding


def mrope_positions(token_types: Iterable[int], image_grids: Iterable[Sequence[int]], spatial_merge: int,
                    start: int = 0) -> tuple[torch.Tensor, int]:
    """Qwen-VL's 3-D rotary position ids for one unpadded sequence.

    Text tokens advance all three axes together; an image's tokens get (t, row, column)
    ids offset by the current position, after which text resumes at the position
    just past the image's largest side. Returns the (3, n) ids and the next position.
    """
    grids = iter(image_grids)
    chunks = []
    position = start
    for kind, run in itertools.groupby(token_types):
        length = sum(1 for _ in run)
        if kind == 0:
            chunks.append(torch.arange(position, position + length).expand(3, -1))
            position += length
            continue
        t, h, w = (int(v) for v in next(grids))
        h, w = h // spatial_merge, w // spatial_merge
        if t * h * w != length:
            raise ValueError(f"image grid {t}x{h}x{w} does not match {length} image tokens")
        grid_t, grid_h, grid_w = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
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

    def __init__(self, processor, config: ModelConfig):
        super().__init__(processor, config)
        image_processor = processor.image_processor
        image_processor.size = {"shortest_edge": config.min_pixels, "longest_edge": config.max_pixels}
        self.spatial_merge = int(image_processor.merge_size)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")
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

    def content_text(self, item: Item) -> str:
        """Item text (truncated) with its image marked by one ``<|image_pad|>`` vision block."""
        text = self._truncate(item.text or "", self.config.max_text_tokens)
        if item.image is not None:
            if IMAGE_PLACEHOLDER.search(text):
                text = IMAGE_PLACEHOLDER.sub(VISION_BLOCK, text, count=1)
            else:
                text = VISION_BLOCK + text
        return text

    def chat_prefix(self, system: str) -> str:
        return f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n"

    def answer_prefix(self) -> str:
        return "<|im_end|>\n<|im_start|>assistant\n"

    @property
    def soft_token(self) -> str:
        return SOFT_TOKEN

    def format_item(self, item: Item, num_slots: int) -> str:
        """The chat-formatted text of one item, image marked by one ``<|image_pad|>``."""
        system = self._truncate(item.instruction if item.instruction else self.config.system_prompt,
                                self.config.max_instruction_tokens)
        return self.chat_prefix(system) + self.content_text(item) + self.answer_prefix() + SLOT_TOKEN * num_slots

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

    def tokenize_blocks(self, texts: Sequence[str], images: Sequence) -> TokenizedBlocks:
        with self._processor_lock:
            encoded = self.processor(text=list(texts), images=list(images) or None, padding=False,
                                     return_mm_token_type_ids=True, **ALREADY_SIZED)
        grids = [list(map(int, grid)) for grid in encoded.get("image_grid_thw", [])]
        pixel_values = encoded.get("pixel_values")
        return TokenizedBlocks(
            input_ids=[list(ids) for ids in encoded["input_ids"]],
            token_types=[list(types) for types in encoded["mm_token_type_ids"]],
            image_grids=grids,
            pixel_values=None if pixel_values is None else torch.as_tensor(pixel_values),
            patches_per_image=[t * h * w for t, h, w in grids],
        )

    def tokenize_blocks_with_grids(self, texts: Sequence[str], image_grids: Sequence[Sequence[int]]
                                   ) -> TokenizedBlocks:
        """Expand each ``<|image_pad|>`` to its image's token count (what the processor does when
        given the image) and tokenise without images."""
        grids = iter(image_grids)
        image_token = self.processor.image_token
        merge = self.spatial_merge ** 2

        def expand(text: str) -> str:
            pieces = text.split(image_token)
            out = [pieces[0]]
            for piece in pieces[1:]:
                grid = next(grids, None)
                if grid is None:
                    raise ValueError(f"more image marks in the texts than the {len(image_grids)} image grids given")
                t, h, w = (int(v) for v in grid)
                out += [image_token * (t * h * w // merge), piece]
            return "".join(out)

        expanded = [expand(text) for text in texts]
        if next(grids, None) is not None:
            raise ValueError(f"{len(image_grids)} image grids for fewer image marks in the texts")
        with self._processor_lock:  # the processor refuses image tokens without images: tokenise directly
            input_ids = [list(ids) for ids in self.tokenizer(expanded, padding=False)["input_ids"]]
        return TokenizedBlocks(input_ids=input_ids,
                               token_types=[[int(t == self.image_token_id) for t in ids] for ids in input_ids],
                               image_grids=[list(map(int, g)) for g in image_grids], pixel_values=None,
                               patches_per_image=[int(t) * int(h) * int(w) for t, h, w in image_grids])

    def block_positions(self, token_types: Sequence[int], image_grids: Sequence[Sequence[int]],
                        start: int) -> tuple[torch.Tensor, int]:
        return mrope_positions(token_types, image_grids, self.spatial_merge, start)

    def load_images(self, items: Sequence[Item], where: str, indices: Sequence[int]) -> list:
        return [load_image_for_model(item.image, self.config.min_pixels, self.config.max_pixels,
                                     where=f"{where} {index}")
                for index, item in zip(indices, items) if item.image is not None]

    def prepare(self, items: Sequence[Item], num_slots: int, where: str = "item",
                indices: Sequence[int] | None = None) -> EncoderBatch:
        indices = list(range(len(items))) if indices is None else list(indices)
        for index, item in zip(indices, items):
            self.check_user_text(item, f"{where} {index}")
        texts = [self.format_item(item, num_slots) for item in items]
        images = self.load_images(items, where, indices)
        with self._processor_lock:
            encoded = self.processor(text=texts, images=images or None, padding=True, padding_side="left",
                                     return_tensors="pt", return_mm_token_type_ids=True, **ALREADY_SIZED)
        input_ids = encoded["input_ids"]
        attention_mask = encoded["attention_mask"]
        lengths = attention_mask.sum(dim=1).tolist()
        for row, length in enumerate(lengths):
            if length > self.config.max_sequence_tokens:
                raise ItemError(f"{where} {indices[row]}: {int(length)} tokens (instruction, text and image), over "
                                f"model.max_sequence_tokens={self.config.max_sequence_tokens}; shorten the text, "
                                "lower the image size limit (model.max_pixels; --max-pixels in eval mmeb) or "
                                "raise model.max_sequence_tokens")
        token_types = encoded["mm_token_type_ids"]
        grids = encoded.get("image_grid_thw")
        if num_slots and not bool((input_ids[:, -num_slots:] == self.slot_token_id).all()):
            bad = [indices[row] for row in range(len(items))
                   if not bool((input_ids[row, -num_slots:] == self.slot_token_id).all())]
            raise ItemError(f"{where} {bad[0] if bad else indices[0]}: the learnable slots did not end the "
                            "sequence (does the text contain chat special tokens?)")
        position_ids = torch.zeros((3, *input_ids.shape), dtype=torch.long)
        grid_rows = iter(grids.tolist() if grids is not None else [])
        for row, item in enumerate(items):
            valid = attention_mask[row].bool()
            row_grids = [next(grid_rows)] if item.image is not None else []
            positions, _ = mrope_positions(token_types[row][valid].tolist(), row_grids, self.spatial_merge)
            position_ids[:, row, valid] = positions
        return EncoderBatch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            mm_token_type_ids=token_types,
            num_slots=num_slots,
            pixel_values=encoded.get("pixel_values"),
            image_grid_thw=grids,
        )

    def estimate_length(self, item: Item) -> int:
        length = len(item.text or "") // 3 + len(item.instruction or self.config.system_prompt) // 3
        if item.image is not None:
            size = _image_size(item.image)
            if size is not None:
                try:
                    height, width = target_size(size[1], size[0], self.config.min_pixels, self.config.max_pixels)
                except ValueError:  # an unusable size: loading the image reports it, naming the item
                    return length
                length += height * width // (14 * 14 * self.spatial_merge ** 2)
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

    def input_embeddings(self, backbone: nn.Module, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                         image_grid_thw: torch.Tensor | None = None,
                         image_features: torch.Tensor | None = None) -> torch.Tensor:
        embeds = self.text_embeddings(backbone, input_ids)
        if image_features is not None:
            features = image_features.to(embeds.device)
        elif pixel_values is None:
            return embeds
        else:
            features = self.image_features(backbone, pixel_values, image_grid_thw)
        image_mask = input_ids == self.image_token_id
        if int(image_mask.sum()) != features.shape[0]:
            raise ValueError(f"{int(image_mask.sum())} image tokens but {features.shape[0]} image features")
        return embeds.masked_scatter(image_mask.unsqueeze(-1), features.to(embeds.dtype))

    def language_model(self, backbone: nn.Module, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                       position_ids: torch.Tensor) -> torch.Tensor:
        causal_lm = self.causal_lm(backbone)
        configure_attention(causal_lm, self.config.attn_implementation)
        language_model = self.core(backbone).language_model
        if attention_mask.dim() == 2:
            return language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                                  use_cache=False).last_hidden_state
        if attention_mask.dtype != torch.bool or attention_mask.dim() != 4:
            raise ValueError(f"attention_mask must be 2-D or a 4-D boolean block mask, got {attention_mask.dim()}-D "
                             f"{attention_mask.dtype}")
        with masked_attention(causal_lm) as kernel:
            mask = mask_for_kernel(attention_mask, kernel, inputs_embeds.dtype)
            return language_model(inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=position_ids,
                                  use_cache=False).last_hidden_state

    def packed_language_model(self, backbone: nn.Module, inputs_embeds: torch.Tensor, position_ids: torch.Tensor,
                              lengths: torch.Tensor) -> torch.Tensor:
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
                                                      position_ids=positions, use_cache=False).last_hidden_state
        owner = torch.repeat_interleave(torch.arange(len(lengths), device=inputs_embeds.device),
                                        lengths.to(inputs_embeds.device))
        total = owner.shape[0]
        causal = torch.ones(total, total, dtype=torch.bool, device=inputs_embeds.device).tril()
        mask = (owner[:, None] == owner[None, :]) & causal
        return self.language_model(backbone, inputs_embeds, mask[None, None], position_ids)

    def output_rows(self, backbone: nn.Module, token_ids: Sequence[int]) -> torch.Tensor:
        weight = self.causal_lm(backbone).get_output_embeddings().weight
        return weight[torch.as_tensor(list(token_ids), device=weight.device)]


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
