"""Qwen3-VL video input (tiny random Qwen3-VL, the real transformers classes): its own timestamped
prompt layout and M-RoPE ids checked against transformers' processor and ``get_rope_index``, our
forward against ``Qwen3VLModel.forward`` (DeepStack at the video tokens), batching, packed
matching, file vs frame list, a training step, and clear errors for bad videos.

Videos are 4-10 frames of 64 x 64 px (2 x 2 merged tokens of 16 px patches per frame pair):
seconds per test on a CPU.
"""

from __future__ import annotations

import dataclasses
import types

import av
import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
from transformers.video_utils import VideoMetadata

from tests.support import videos as video_support
from tests.support.matching import assert_packed_equals_reference
from tests.support.steps import assert_same, run_step
from tests.support.videos import video_examples
from rematch import Item, ReMatchModel
from rematch.backbones.base import DeepStack
from rematch.config import LossConfig
from rematch.training.collate import TrainCollator
from rematch.data.video import VideoLoadError
from rematch.matching import (
    DOCUMENT_HEADER,
    MatchSample,
    processed_images,
    raw_views,
)
from rematch.training.step import ReMatchTrainingModule
from rematch.training.vision_cache import vision_tower_frozen, with_image_features

FPS = 4
SIDE = 64
SETTINGS = dict(num_tokens=4, seed=0, max_pixels=SIDE * SIDE, min_pixels=32 * 32, video_fps=float(FPS), video_max_frames=8)
INSTRUCTION = "Does the document match the query? Answer only Yes or No."


def moving_square(count: int, colour=(220, 40, 40), seed: int = 0) -> list[Image.Image]:
    return video_support.moving_square(count, colour, seed, side=SIDE, step=6, top=20)


def write_mp4(path, frames: list[Image.Image], fps: int = FPS) -> str:
    return video_support.write_mp4(path, frames, fps)


@pytest.fixture(scope="module")
def model() -> ReMatchModel:
    return ReMatchModel.tiny(backbone="qwen3_vl", **SETTINGS)


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> str:
    return write_mp4(tmp_path_factory.mktemp("video") / "clip.mp4", moving_square(8))


def mixed_items() -> list[Item]:
    """Text, video, image and video rows: 10 listed frames sample to 8 (uneven indices, so the
    timestamps are not a plain multiple of the frame step); 4 frames give 2 temporal patches."""
    return [Item(text="a red square slides to the right"),
            Item(video=tuple(moving_square(10)), text="<video> Which way does the square move?"),
            Item(image=moving_square(1, (40, 200, 40))[0].resize((96, 64)), text="a green square"),
            Item(video=tuple(moving_square(4, (40, 40, 220), seed=1))),
            Item(text="a short caption")]


def transformers_video_text(grid, frames_indices, fps: float) -> str:
    """transformers' own Qwen3VLProcessor.replace_video_token for one video (no torchvision needed)."""
    fake = types.SimpleNamespace(
        video_processor=types.SimpleNamespace(merge_size=2, temporal_patch_size=2), video_token="<|video_pad|>",
        vision_start_token="<|vision_start|>", vision_end_token="<|vision_end|>",
        _calculate_timestamps=lambda indices, video_fps, merge_size: Qwen3VLProcessor._calculate_timestamps(
            None, indices, video_fps, merge_size))
    inputs = {"video_grid_thw": torch.tensor([grid]),
              "video_metadata": [VideoMetadata(total_num_frames=len(frames_indices), fps=fps,
                                               frames_indices=list(frames_indices))]}
    return Qwen3VLProcessor.replace_video_token(fake, inputs, 0)


def plain_forward(model: ReMatchModel, batch) -> torch.Tensor:
    with torch.no_grad():
        return model.adapter.core(model.backbone)(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values,
            image_grid_thw=batch.image_grid_thw, pixel_values_videos=batch.pixel_values_videos,
            video_grid_thw=batch.video_grid_thw, mm_token_type_ids=batch.mm_token_type_ids).last_hidden_state


# ------------------------------------------------------------------ the prompt layout and the patches


def test_the_video_prompt_is_transformers_timestamped_layout(model, clip):
    """The bare <|video_pad|> mark expands exactly as transformers' Qwen3VLProcessor expands it."""
    tokenizer = model.adapter.tokenizer
    listed = model.prepare([Item(video=tuple(moving_square(10)), text="<video> what moves?")])
    from_file = model.prepare([Item(video=clip, text="<video> what moves?")])
    # listed: frames 0,1,3,4,5,6,8,9 of 10 at 4 fps; file: all 8 frames at 4 fps
    for batch, indices in ((listed, [0, 1, 3, 4, 5, 6, 8, 9]), (from_file, list(range(8)))):
        assert batch.video_grid_thw.tolist() == [[4, 4, 4]]
        assert batch.video_timestamps == [[index / FPS for index in indices]]
        expected = (model.adapter.chat_prefix(model.config.system_prompt)
                    + transformers_video_text([4, 4, 4], indices, FPS) + " what moves?"
                    + model.adapter.answer_prefix() + "<|endoftext|>" * 4)
        assert batch.input_ids[0].tolist() == tokenizer(expected)["input_ids"]
    text = tokenizer.decode(listed.input_ids[0])
    assert "<0.1 seconds><|vision_start|><|video_pad|>" in text and "<2.1 seconds>" in text
    assert text.count("<|vision_start|>") == 4 and text.count("<|video_pad|>") == 16
    types_ = listed.mm_token_type_ids[0]
    assert int((types_ == 2).sum()) == 16 and int((types_ == 1).sum()) == 0


def test_video_patches_are_qwen3_video_processor_patches(model):
    """16 px patches, temporal 2, merge 2 and mean = std = 0.5 (Qwen3VLVideoProcessor's defaults),
    in the layout its patchify writes."""
    reference = Qwen3VLVideoProcessor()
    image_processor = model.processor.image_processor
    for name in ("patch_size", "temporal_patch_size", "merge_size"):
        assert int(getattr(image_processor, name)) == int(getattr(reference, name)), name
    np.testing.assert_allclose(image_processor.image_mean, reference.image_mean)
    np.testing.assert_allclose(image_processor.image_std, reference.image_std)
    frames = moving_square(4)
    batch = model.prepare([Item(video=tuple(frames))])
    pixels = torch.tensor(np.stack([np.asarray(frame) for frame in frames]), dtype=torch.float32)
    mean, std = torch.tensor(reference.image_mean), torch.tensor(reference.image_std)
    normalised = ((pixels * reference.rescale_factor - mean) / std).permute(0, 3, 1, 2)[None]  # (1, T, C, H, W)
    patches, grid_t, grid_h, grid_w = reference.patchify(normalised, reference.patch_size, reference.merge_size,
                                                         reference.temporal_patch_size)
    assert batch.video_grid_thw.tolist() == [[grid_t, grid_h, grid_w]] == [[2, 4, 4]]
    torch.testing.assert_close(batch.pixel_values_videos, patches[0], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ the video path vs transformers


def test_position_ids_equal_transformers_get_rope_index_for_mixed_rows(model):
    batch = model.prepare(mixed_items())
    assert (batch.mm_token_type_ids == 2).any() and (batch.mm_token_type_ids == 1).any()
    assert not batch.attention_mask.bool().all()  # left padding present
    expected, _ = model.adapter.core(model.backbone).get_rope_index(
        batch.input_ids, batch.mm_token_type_ids, image_grid_thw=batch.image_grid_thw,
        video_grid_thw=batch.video_grid_thw, attention_mask=batch.attention_mask)
    valid = batch.attention_mask.bool()
    assert torch.equal(batch.position_ids[:, valid], expected[:, valid])
    # every frame group is numbered like an image: temporal id = its first spatial id
    video = batch.mm_token_type_ids[3] == 2
    assert torch.equal(batch.position_ids[0, 3][video][::4], batch.position_ids[1, 3][video][::4])


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding-free"])
def test_last_hidden_state_equals_the_transformers_forward_with_videos(padding_free):
    model = ReMatchModel.tiny(backbone="qwen3_vl", **{**SETTINGS, "num_tokens": 0}, pooling="last", padding_free=padding_free)
    batch = model.prepare(mixed_items())
    reference = plain_forward(model, batch)
    adapter, valid = model.adapter, batch.attention_mask.bool()
    with torch.no_grad():
        embeds, deepstack = adapter.embed_inputs(model.backbone, batch.input_ids, batch.pixel_values,
                                                 batch.image_grid_thw, **batch.video_inputs())
        ours = adapter.language_model(model.backbone, embeds, batch.attention_mask, batch.position_ids, deepstack)
        pooled = model.embed(batch, "query").token_states[:, -1]
    assert isinstance(deepstack, DeepStack) and int(deepstack.visual_mask.sum()) == 16 + 8 + sum(batch.image_token_counts())
    torch.testing.assert_close(ours[valid], reference[valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled, reference[:, -1], atol=1e-5, rtol=1e-5)
    # the video rows' DeepStack features matter: without them row 3 (a video only) changes
    dropped = adapter.language_model(model.backbone, embeds, batch.attention_mask, batch.position_ids,
                                     dataclasses.replace(deepstack, layers=tuple(
                                         torch.where((batch.input_ids[deepstack.visual_mask]
                                                      == adapter.video_token_id)[:, None], 0, layer)
                                         for layer in deepstack.layers)))
    assert (dropped[3] - reference[3]).abs().max() > 1e-3


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding-free"])
def test_batch_invariance_with_mixed_text_image_video_rows(model, padding_free):
    encoder = model if not padding_free else ReMatchModel(model.backbone, model.processor,
                                                          dataclasses.replace(model.config, padding_free=True))
    items = mixed_items()
    together = encoder.encode(items, batch_size=8)
    alone = np.stack([encoder.encode([item])[0] for item in items])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    assert np.isfinite(together).all() and len({tuple(np.round(row, 4)) for row in together}) == len(items)


def test_a_file_and_its_frames_as_a_list_give_the_same_embedding(model, clip):
    with av.open(clip) as container:
        frames = [frame.to_image().convert("RGB") for frame in container.decode(video=0)]
    assert len(frames) == 8
    from_file = model.prepare([Item(video=clip, text="what moves?")])
    from_list = model.prepare([Item(video=tuple(frames), text="what moves?")])
    assert torch.equal(from_file.input_ids, from_list.input_ids)  # same timestamps in the text
    assert torch.equal(from_file.pixel_values_videos, from_list.pixel_values_videos)
    embeddings = model.encode([Item(video=clip, text="what moves?"), Item(video=frames, text="what moves?")])
    np.testing.assert_allclose(embeddings[0], embeddings[1], atol=1e-6)


# ------------------------------------------------------------------ matching and training


def test_raw_views_from_processed_videos_equal_the_processor_tokens(model):
    """The matching branch re-writes a processed video from its grid and frame times: the same ids."""
    items = mixed_items()
    batch = model.prepare(items, role="document")
    views = raw_views(model.adapter, items, DOCUMENT_HEADER, processed_images(batch),
                      [f"document {i}" for i in range(len(items))])
    texts = [DOCUMENT_HEADER + model.adapter.content_text(item) for item in items]
    loaded = model.adapter.tokenize_blocks(texts, [model.adapter.load_image(items[2].image, "image")],
                                           [model.adapter.load_video(item.video, "video") for item in items
                                            if item.video is not None])
    assert [view.ids for view in views] == loaded.input_ids
    assert [view.types for view in views] == loaded.token_types


def test_packed_matching_equals_the_reference_with_video_views(model):
    items = mixed_items()
    samples = [MatchSample(items[1], (items[0], items[3]), (True, False)),
               MatchSample(items[0], (items[2], items[1]), (False, True))]
    packed, _ = assert_packed_equals_reference(model, samples, INSTRUCTION)
    assert packed.video_grid_thw.shape[0] == 3 and packed.image_grid_thw.shape[0] == 1


def test_a_training_step_with_videos_reuses_the_frozen_tower_with_the_same_loss_and_gradients():
    """LoRA (frozen tower): the step's video features, DeepStack included, are computed once and give
    the loss and gradients of running the tower in every pass (GradCache chunks and matching too)."""
    model = ReMatchModel.tiny(backbone="qwen3_vl", **SETTINGS)
    model.enable_lora(r=4, alpha=8, dropout=0.0)
    assert vision_tower_frozen(model)
    batch = TrainCollator(model, matching=True)(video_examples(mixed_items(), moving_square))
    cached = with_image_features(model, batch)
    assert len(cached.image_features) == 7  # 1 image and 6 videos, one table in row order
    assert cached.queries.video_features.shape[-1] == 3 * model.hidden_size  # final + 2 DeepStack layers
    loss = LossConfig(matching=0.1, matching_samples=4)
    old_terms, old_grads = run_step(ReMatchTrainingModule(model, loss, seed=0, reuse_image_features=False,
                                                          reuse_processed_images=False), batch, None, step=1)
    new_terms, new_grads = run_step(ReMatchTrainingModule(model, loss, seed=0), batch, 2, step=1)
    assert "matching" in new_terms and all(np.isfinite(value) for value in new_terms.values())
    assert set(old_terms) <= set(new_terms)  # every term of the plain step is compared
    assert_same(old_terms, old_grads, new_terms, new_grads)


# ------------------------------------------------------------------ errors


def test_unreadable_videos_name_the_item_and_the_file(model, tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    cases = [(Item(video=str(broken)), r"query row 1: cannot read video .*broken\.mp4"),
             (Item(video=str(tmp_path / "missing.mp4")), r"query row 1: video file not found: .*missing\.mp4"),
             (Item(video=(moving_square(1)[0], str(tmp_path / "gone.png"))),
              r"query row 1: video frame 1 \(.*gone\.png\): image file not found")]
    for item, message in cases:
        with pytest.raises(VideoLoadError, match=message):
            model.prepare([Item(text="fine"), item], where="query row")
