"""Video input on tiny random Qwen2-VL / Qwen2.5-VL (real transformers classes): decoding and
sampling, the video path checked against transformers' own numbering and forward, batching,
GradCache rows, frozen-tower reuse, packed matching, and clear errors for bad videos.

Videos are 4-10 frames of 56 x 56 px (one 2 x 2 merge window of 14 px patches per frame
pair and merge): seconds per test on a CPU.
"""

from __future__ import annotations

import av
import numpy as np
import pytest
import torch
from PIL import Image

from tests.support import videos as video_support
from tests.support.matching import assert_packed_equals_reference
from tests.support.steps import assert_same, run_step
from tests.support.videos import video_examples
from rematch import Item, ItemError, ReMatchModel
from rematch.backbones.processor import video_patches
from rematch.config import LossConfig
from rematch.training.collate import TrainCollator
from rematch.data.records import TrainExample
from rematch.data.validation import DataError
from rematch.data.video import VideoLoadError, load_video_frames
from rematch.matching import MatchSample
from rematch.training.step import ReMatchTrainingModule
from rematch.training.vision_cache import vision_tower_frozen, with_image_features

FPS = 4  # frames per second of the written test videos, and the models' video_fps
SIDE = 56
INSTRUCTION = "Does the document match the query? Answer only Yes or No."
FAMILIES = ["qwen2_vl", "qwen2_5_vl"]


def moving_square(count: int, colour=(220, 40, 40), seed: int = 0) -> list[Image.Image]:
    return video_support.moving_square(count, colour, seed, side=SIDE, step=4, top=18)


def write_mp4(path, frames: list[Image.Image], fps: int = FPS) -> str:
    return video_support.write_mp4(path, frames, fps)


def decoded_frames(path) -> list[Image.Image]:
    """Every frame of a file, decoded here independently of rematch."""
    with av.open(str(path)) as container:
        return [frame.to_image().convert("RGB") for frame in container.decode(video=0)]


@pytest.fixture(scope="module")
def models() -> dict[str, ReMatchModel]:
    return {family: ReMatchModel.tiny(backbone=family, num_tokens=4, seed=0, max_pixels=SIDE * SIDE, video_fps=float(FPS),
                                      video_max_frames=8) for family in FAMILIES}


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> str:
    return write_mp4(tmp_path_factory.mktemp("video") / "clip.mp4", moving_square(8))


def mixed_items() -> list[Item]:
    """Text, image and video rows; 10 listed frames sample to 8 at 3.2 fps: 0.625 s per temporal
    patch, a non-integer Qwen2.5-VL temporal step (4 tokens/s x 0.625 s = 2.5)."""
    return [Item(text="a red square slides to the right"),
            Item(video=tuple(moving_square(10)), text="<video> Which way does the square move?"),
            Item(image=moving_square(1, (40, 200, 40))[0], text="a green square"),
            Item(video=tuple(moving_square(4, (40, 40, 220), seed=1))),
            Item(text="a short caption")]


# ------------------------------------------------------------------ decoding and sampling


def test_a_file_and_its_decoded_frames_as_a_list_give_the_same_embedding(models, clip):
    model = models["qwen2_5_vl"]
    frames = decoded_frames(clip)
    assert len(frames) == 8
    from_file = model.prepare([Item(video=clip, text="what moves?")])
    from_list = model.prepare([Item(video=tuple(frames), text="what moves?")])
    assert from_file.video_grid_thw.tolist() == from_list.video_grid_thw.tolist() == [[4, 4, 4]]
    assert from_file.second_per_grid_ts == from_list.second_per_grid_ts == [0.5]  # 2 frames at 4 fps
    assert torch.equal(from_file.pixel_values_videos, from_list.pixel_values_videos)
    embeddings = model.encode([Item(video=clip, text="what moves?"), Item(video=frames, text="what moves?")])
    np.testing.assert_allclose(embeddings[0], embeddings[1], atol=1e-6)


@pytest.mark.parametrize("fps,max_frames,expected_indices", [
    (1.0, 16, [0, 7]),  # 2 s at 1 fps: the first and the last frame
    (2.0, 16, [0, 2, 5, 7]),
    (4.0, 16, list(range(8))),
    (30.0, 16, list(range(8))),  # never more frames than the file has
    (4.0, 3, [0, 4, 7, 7]),  # 3 spread frames, the last repeated to an even count
    (4.0, 1, [0, 0]),
])
def test_file_sampling_follows_fps_and_max_frames(clip, fps, max_frames, expected_indices):
    video = load_video_frames(clip, fps, max_frames)
    assert video.timestamps == [index / FPS for index in expected_indices]
    reference = decoded_frames(clip)
    for frame, index in zip(video.frames, expected_indices):
        assert np.array_equal(np.asarray(frame), np.asarray(reference[index]))
    real = len(set(expected_indices))
    assert video.fps == pytest.approx(FPS * real / 8)


def test_frame_lists_and_directories_are_thinned_by_max_frames_only(tmp_path):
    frames = moving_square(20)
    video = load_video_frames(frames, fps=2.0, max_frames=8)
    assert len(video) == 8 and video.timestamps[0] == 0 and video.timestamps[-1] == 19 / 2
    assert np.array_equal(np.asarray(video.frames[-1]), np.asarray(frames[-1]))
    assert video.fps == pytest.approx(2.0 * 8 / 20)
    odd = load_video_frames(frames[:5], fps=2.0, max_frames=16)
    assert len(odd) == 6 and odd.frames[-1] is odd.frames[-2]
    for index, frame in enumerate(frames[:11]):  # frame_2 must come before frame_10
        frame.save(tmp_path / f"frame_{index}.png")
    (tmp_path / "notes.txt").write_text("not a frame")
    from_directory = load_video_frames(tmp_path, fps=2.0, max_frames=16)
    assert len(from_directory) == 12  # 11 frames + the last repeated
    for got, expected in zip(from_directory.frames, frames[:11]):
        assert np.array_equal(np.asarray(got), np.asarray(expected))


def test_video_patches_of_a_repeated_frame_equal_the_image_processors(models):
    processor = models["qwen2_vl"].processor
    image = moving_square(1)[0].resize((84, 56))
    as_image = processor.image_processor(images=[image], do_resize=False, return_tensors="np")
    patches, grid = video_patches(np.stack([np.asarray(image)] * 2), processor.image_processor)
    assert grid == as_image["image_grid_thw"][0].tolist() == [1, 4, 6]
    np.testing.assert_allclose(patches, as_image["pixel_values"], atol=1e-6)


# ------------------------------------------------------------------ the video path vs transformers


@pytest.mark.parametrize("family", FAMILIES)
def test_video_position_ids_equal_transformers_get_rope_index(models, family):
    model = models[family]
    batch = model.prepare(mixed_items())
    assert (batch.mm_token_type_ids == 2).any() and (batch.mm_token_type_ids == 1).any()
    assert batch.second_per_grid_ts == [0.625, 0.5]
    extra = {"second_per_grid_ts": torch.tensor(batch.second_per_grid_ts)} if family == "qwen2_5_vl" else {}
    expected, _ = model.adapter.core(model.backbone).get_rope_index(
        batch.input_ids, mm_token_type_ids=batch.mm_token_type_ids, image_grid_thw=batch.image_grid_thw,
        video_grid_thw=batch.video_grid_thw, attention_mask=batch.attention_mask, **extra)
    valid = batch.attention_mask.bool()
    assert torch.equal(batch.position_ids[:, valid], expected[:, valid])
    times = batch.position_ids[0, 1][batch.mm_token_type_ids[1] == 2].unique()
    steps = (times[1:] - times[:-1]).tolist()
    assert steps == ([1, 1, 1] if family == "qwen2_vl" else [2, 3, 2])  # 2.5 per patch, truncated as transformers


@pytest.mark.parametrize("family", FAMILIES)
def test_embedding_forward_equals_plain_transformers_for_video_rows(models, family):
    model = models[family]
    batch = model.prepare(mixed_items())
    extra = {"second_per_grid_ts": torch.tensor(batch.second_per_grid_ts)} if family == "qwen2_5_vl" else {}
    adapter, backbone = model.adapter, model.backbone
    with torch.no_grad():
        plain = adapter.core(backbone)(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values,
            image_grid_thw=batch.image_grid_thw, pixel_values_videos=batch.pixel_values_videos,
            video_grid_thw=batch.video_grid_thw, mm_token_type_ids=batch.mm_token_type_ids, **extra).last_hidden_state
        embeds = adapter.input_embeddings(backbone, batch.input_ids, batch.pixel_values, batch.image_grid_thw,
                                          pixel_values_videos=batch.pixel_values_videos,
                                          video_grid_thw=batch.video_grid_thw)
        ours = adapter.language_model(backbone, embeds, batch.attention_mask, batch.position_ids)
    valid = batch.attention_mask.bool()
    torch.testing.assert_close(ours[valid], plain[valid], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding-free"])
def test_batch_invariance_with_mixed_text_image_video_rows(models, padding_free):
    base = models["qwen2_5_vl"]
    model = base if not padding_free else ReMatchModel(base.backbone, base.processor,
                                                      _replace(base.config, padding_free=True))
    items = mixed_items()
    together = model.encode(items, batch_size=8)
    alone = np.stack([model.encode([item])[0] for item in items])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    assert np.isfinite(together).all()


def _replace(config, **changes):
    import dataclasses

    return dataclasses.replace(config, **changes)


def test_rows_slices_videos_with_their_rows(models):
    model = models["qwen2_5_vl"]
    batch = model.prepare(mixed_items(), role="document")
    with torch.no_grad():
        full = model.embed(batch, "document").embedding
        head, tail = batch.rows(0, 2), batch.rows(2, 5)
        assert head.video_grid_thw.shape[0] == 1 and head.pixel_values is None
        assert tail.video_grid_thw.shape[0] == 1 and tail.image_grid_thw.shape[0] == 1
        assert head.second_per_grid_ts == [0.625] and tail.second_per_grid_ts == [0.5]
        parts = [model.embed(part, "document").embedding for part in (head, tail)]
    torch.testing.assert_close(torch.cat(parts), full, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------ matching and training


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_matching_equals_the_reference_with_video_views(models, family):
    model = models[family]
    items = mixed_items()
    samples = [MatchSample(items[1], (items[0], items[3]), (True, False)),
               MatchSample(items[0], (items[2], items[1]), (False, True))]
    packed, _ = assert_packed_equals_reference(model, samples, INSTRUCTION)
    assert packed.video_grid_thw.shape[0] == 3 and packed.image_grid_thw.shape[0] == 1


def test_a_training_step_with_videos_reuses_the_frozen_tower_with_the_same_loss_and_gradients():
    model = ReMatchModel.tiny(num_tokens=4, seed=0, max_pixels=SIDE * SIDE, backbone="qwen2_5_vl", video_fps=float(FPS))
    model.enable_lora(r=4, alpha=8, dropout=0.0)
    assert vision_tower_frozen(model)
    batch = TrainCollator(model, matching=True)(video_examples(mixed_items(), moving_square))
    cached = with_image_features(model, batch)
    assert len(cached.image_features) == 7  # 1 image and 6 videos, one table in row order
    with torch.no_grad():
        for side in (cached.queries, cached.positives, cached.negatives):
            for start in range(len(side)):
                row = side.rows(start, start + 1)
                if row.pixel_values_videos is not None:
                    expected = model.adapter.video_features(model.backbone, row.pixel_values_videos,
                                                            row.video_grid_thw)
                    torch.testing.assert_close(row.video_features, expected, rtol=1e-4, atol=1e-5)
    loss = LossConfig(matching=0.1, matching_samples=4)
    old_terms, old_grads = run_step(ReMatchTrainingModule(model, loss, seed=0, reuse_image_features=False,
                                                          reuse_processed_images=False), batch, None, step=1)
    new_terms, new_grads = run_step(ReMatchTrainingModule(model, loss, seed=0), batch, 2, step=1)
    assert "matching" in new_terms
    assert set(old_terms) <= set(new_terms)  # every term of the plain step is compared
    assert_same(old_terms, old_grads, new_terms, new_grads)


# ------------------------------------------------------------------ items and errors


def test_items_take_a_video_and_its_cache_key_covers_the_frames(clip):
    frames = moving_square(4)
    from rematch.data.items import as_items

    item, same, other, path = as_items([{"video": frames, "text": "a"}, {"video": list(frames), "text": "a"},
                                        {"video": moving_square(4, seed=3), "text": "a"}, {"video": clip}])
    assert isinstance(item.video, tuple) and item.has_visual and not item.has_image
    assert item.cache_key() == same.cache_key() != other.cache_key()
    assert clip in path.cache_key()
    assert Item(text="a").cache_key() == repr(("a", None, None))  # text and image keys are unchanged


@pytest.mark.parametrize("value,message", [
    ({"video": []}, r"item 0: field 'video' is an empty list of frames"),
    ({"video": ["a.png", 3]}, r"item 0: field 'video' frame 1 must be a path or a PIL image, got int"),
    ({"video": 7}, r"item 0: field 'video' must be a path .* got int"),
    ({"video": "v.mp4", "image": "i.png"}, r"item 0: has both an image and a video"),
    ({"text": "<video> what?"}, r"item 0: field 'text' has a video placeholder but the item has no video"),
    ({"text": "<video><video>", "video": "v.mp4"}, r"item 0: field 'text' has 2 video placeholders"),
])
def test_bad_video_fields_are_named(value, message):
    from rematch.data.items import as_items

    with pytest.raises(ItemError, match=message):
        as_items([value])


def test_unreadable_videos_name_the_item_and_the_file(models, tmp_path):
    model = models["qwen2_vl"]
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    empty_dir = tmp_path / "no_frames"
    empty_dir.mkdir()
    frames = moving_square(3)
    cases = [(Item(video=str(broken)), r"item 1: cannot read video .*broken\.mp4"),
             (Item(video=str(tmp_path / "missing.mp4")), r"item 1: video file not found: .*missing\.mp4"),
             (Item(video=str(empty_dir)), r"item 1: the frame directory .*no_frames holds no frame images"),
             (Item(video=(frames[0], str(tmp_path / "gone.png"), frames[2])),
              r"item 1: video frame 1 \(.*gone\.png\): image file not found")]
    for item, message in cases:
        with pytest.raises(VideoLoadError, match=message):
            model.encode([Item(text="fine"), item])


def test_a_training_row_with_an_unreadable_video_is_skipped_and_counted(models, tmp_path):
    model = models["qwen2_vl"]
    broken = tmp_path / "broken.webm"
    broken.write_bytes(b"not a video at all")
    good = TrainExample(Item(text="a red square"), Item(video=tuple(moving_square(2))))
    bad = TrainExample(Item(video=str(broken)), Item(text="whatever"))
    with pytest.raises(DataError, match=r"qry_video_path.*broken\.webm"):
        TrainCollator(model)([good, bad])
    collator = TrainCollator(model, skip_bad=True)
    batch = collator([good, bad])
    assert len(batch) == 1 and collator.report.total == 1


def test_video_settings_are_validated_and_enter_the_fingerprint_only_when_set(models):
    from rematch.config import ConfigError, ModelConfig

    for bad in ({"video_fps": 0.0}, {"video_max_frames": 0}, {"video_max_pixels": 10}):
        with pytest.raises(ConfigError, match="model.video_"):
            ModelConfig(**bad).validate()
    model = models["qwen2_vl"]  # video_fps=4, video_max_frames=8: set, so part of the identity
    default = ReMatchModel(model.backbone, model.processor, _replace(model.config, video_fps=1.0, video_max_frames=16))
    assert default.config.frame_max_pixels == default.config.max_pixels
    changed = ReMatchModel(model.backbone, model.processor, _replace(default.config, video_max_pixels=112 * 112))
    assert len({model.fingerprint(), default.fingerprint(), changed.fingerprint()}) == 3


def test_an_index_keeps_video_items_for_reranking(models, clip, tmp_path):
    from rematch.retrieval.index import Index

    model = models["qwen2_vl"]
    frame_files = []
    for index, frame in enumerate(moving_square(4)):
        frame.save(tmp_path / f"f{index}.png")
        frame_files.append(str(tmp_path / f"f{index}.png"))
    items = [Item(video=clip, text="a clip"), Item(video=tuple(frame_files)), Item(text="words")]
    index = Index.build(model, items=items, ids=["clip", "frames", "text"])
    assert index.item(0) == items[0] and index.item(1) == items[1] and index.item(2).video is None


# ------------------------------------------------------------------ the MMEB-V2 evaluation rule and real times


def official_indices(total: int, wanted: int) -> list[int]:
    """The harness's rule as its ``process_video_frames`` / ``sample_frames`` write it."""
    return list(range(total)) if wanted > total else np.linspace(0, total - 1, wanted, dtype=int).tolist()


def test_twenty_saved_frames_give_the_official_eight(tmp_path):
    frames = moving_square(20)
    for index, frame in enumerate(frames):
        frame.save(tmp_path / f"frame_{index:04d}.jpg", quality=95)
    expected = [0, 2, 5, 8, 10, 13, 16, 19]
    assert official_indices(20, 8) == expected
    video = load_video_frames(tmp_path, fps=1.0, max_frames=8, sampling="mmeb_v2")
    assert len(video) == 8 and video.timestamps == [float(index) for index in expected]  # i / fps: the rule
    for got, index in zip(video.frames, expected):
        assert np.array_equal(np.asarray(got), np.asarray(Image.open(tmp_path / f"frame_{index:04d}.jpg")))
    # the model's own rule takes other frames of the same directory (rounded, not truncated, positions)
    assert load_video_frames(tmp_path, fps=1.0, max_frames=8).timestamps != video.timestamps
    # fewer saved frames than asked: the harness takes them all (5 -> 6, the last repeated for the tower)
    few = load_video_frames(frames[:5], fps=1.0, max_frames=8, sampling="mmeb_v2")
    assert few.timestamps == [0.0, 1.0, 2.0, 3.0, 4.0, 4.0]
    for total, wanted in ((64, 8), (9, 8), (8, 8), (100, 3), (1, 8)):
        from rematch.data.video import mmeb_v2_indices
        assert mmeb_v2_indices(total, wanted) == official_indices(total, wanted)


def test_a_file_gives_the_frames_the_harness_saves_then_samples(tmp_path):
    """A file: the 64 frames the harness's save_frames keeps (floor(i * total / 64)), then 8 of them."""
    frames = moving_square(100, seed=3)
    path = write_mp4(tmp_path / "long.mp4", frames, fps=10)
    saved = [int(np.floor(i * 100 / 64)) for i in range(64)]
    expected = [saved[j] for j in official_indices(64, 8)]
    assert expected == [0, 14, 28, 42, 56, 70, 84, 98]
    video = load_video_frames(path, fps=1.0, max_frames=8, sampling="mmeb_v2")
    reference = decoded_frames(path)
    assert video.timestamps == pytest.approx([index / 10 for index in expected])
    for got, index in zip(video.frames, expected):
        assert np.array_equal(np.asarray(got), np.asarray(reference[index]))


def test_a_file_gives_its_decoded_frame_times_not_invented_ones(tmp_path):
    """A file whose frames are not evenly spaced: the timestamps are the decoded presentation times."""
    from fractions import Fraction

    path = tmp_path / "gaps.mp4"
    times = [0, 1, 2, 6, 7, 12]  # in quarters of a second: a pause after the third frame
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width = stream.height = SIDE
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = Fraction(1, 4)
        for frame, pts in zip(moving_square(len(times)), times):
            video_frame = av.VideoFrame.from_image(frame)
            video_frame.pts, video_frame.time_base = pts, Fraction(1, 4)
            for packet in stream.encode(video_frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    video = load_video_frames(str(path), fps=4.0, max_frames=16)
    assert video.timestamps == pytest.approx([pts / 4 for pts in times])
    four = load_video_frames(str(path), fps=4.0, max_frames=4, sampling="mmeb_v2")
    assert four.timestamps == pytest.approx([times[i] / 4 for i in official_indices(6, 4)])


def test_the_sampling_rule_is_validated_and_enters_the_fingerprint_only_when_set(models):
    from rematch.config import ConfigError, ModelConfig

    with pytest.raises(ConfigError, match="model.video_sampling"):
        ModelConfig(video_sampling="every").validate()
    with pytest.raises(ValueError, match="video sampling must be one of"):
        load_video_frames(moving_square(2), 1.0, 8, sampling="every")
    fixture = models["qwen2_vl"]  # built the same way as the two below (a loaded model keeps its saved scheme)
    model = ReMatchModel(fixture.backbone, fixture.processor, fixture.config)
    official = ReMatchModel(model.backbone, model.processor, _replace(model.config, video_sampling="mmeb_v2"))
    assert official.fingerprint() != model.fingerprint()
    again = ReMatchModel(model.backbone, model.processor, _replace(official.config, video_sampling="fps"))
    assert again.fingerprint() == model.fingerprint()
