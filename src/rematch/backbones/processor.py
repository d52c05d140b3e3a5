"""A Qwen-VL processor for text and still images that needs no video processor.

transformers 5's ``Qwen2VLProcessor`` insists on a video processor, and the video
processor imports torchvision, which is missing or broken on many machines. Retrieval
never sees video, so this subclass keeps the image path (image-token expansion, the
``mm_token_type_ids`` that M-RoPE needs) and drops the video one. It loads a real
checkpoint's tokenizer and ``preprocessor_config.json`` with the PIL image processor,
with or without torchvision installed.
"""

from __future__ import annotations

import os

from transformers import AutoTokenizer, Qwen2VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.processing_utils import ProcessorMixin

IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"


class ImageOnlyQwenVLProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` minus video: works for Qwen2-VL and Qwen2.5-VL still images."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or IMAGE_TOKEN
        self.video_token = getattr(tokenizer, "video_token", None) or VIDEO_TOKEN
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        # Skip Qwen2VLProcessor.__init__, which requires a video processor.
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs) -> "ImageOnlyQwenVLProcessor":
        """Load the tokenizer and image processor of a local directory or hub checkpoint."""
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(name_or_path, **kwargs)
        return cls(image_processor=image_processor, tokenizer=tokenizer)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Write the tokenizer files and ``preprocessor_config.json`` (the layout of a real checkpoint)."""
        os.makedirs(save_directory, exist_ok=True)
        self.tokenizer.save_pretrained(save_directory)
        self.image_processor.save_pretrained(save_directory)
