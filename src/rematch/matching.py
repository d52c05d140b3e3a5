"""Multi-view query-document matching (MVQDM): the generative Yes/No branch.

The LLM answers, chat-style, whether a document is relevant to a query, seeing the query
either raw (its text and image) or as Z_q = projector(query embedding), and each document
raw or as its own Z. For one query and n documents that is 2 x 2n (query view, document
view) pairs; training uses n = 2 (d+ and d-, in random order), i.e. 8 pairs.

Packed layout (one sequence per query, raw content encoded once)::

    [P][Q][Zq][D1][Zd1]...[Dn][Zdn][A_1]...[A_4n]

    P   chat prefix + matching instruction   (shared by everything)
    Q   "Query: " + raw query                Zq  "Query: " + soft token
    Dj  "Document: " + raw document j        Zdj "Document: " + soft token
    A_p "<|im_end|>\\n<|im_start|>assistant\\n" for pair p; its last state gives Yes/No

A 4-D mask lets every content block see only P and itself, and every answer block only
P, its pair's query view, its pair's document view and itself (causally within blocks).

Position ids: P takes 0..p-1; both query views start at p; every document view starts
after the longer query view; each answer block starts right after its OWN document view.
So each pair sees prompt < query view < document view < answer with no gap between its
document and its answer, whatever the other documents' lengths: the distance from a
document to its answer cannot tell the model which slot (or label) it is looking at, and
a pair is numbered the same in training (two documents per row) as in reranking (one).
Qwen's 3-D M-RoPE ids are used inside image and video blocks. The reference implementation
(:func:`build_reference_batch`) runs each pair as its own sequence with exactly those
positions and the same block visibility; tests check both give the same logits.

Why not reuse the content states of the embedding forward instead? It would make
matching almost free, but it needs the key/value states of that forward, which gradient
checkpointing (required for real models) does not keep. The packed sequence is a plain
forward with a mask, so it composes with checkpointing, LoRA, bf16 and DDP; its cost is
controlled by matching only a sub-batch per step (see the trainer's ``matching_samples``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Sequence

import torch

from rematch.backbones.base import IMAGE, VIDEO, BackboneAdapter, DeepStack, EncoderBatch
from rematch.data.items import Item

QUERY_HEADER = "Query: "
DOCUMENT_HEADER = "\nDocument: "

# Block kinds. Content blocks come in this order; answer blocks follow.
PROMPT, QUERY_RAW, QUERY_SOFT = 0, 1, 2
QUERY_VIEWS = (QUERY_RAW, QUERY_SOFT)
PAD_BLOCK = -1
ANSWER_KIND = 100  # the answer block of pair p has kind ANSWER_KIND + p


def document_blocks(j: int) -> tuple[int, int]:
    """Block ids of document j's raw view and soft view."""
    return 3 + 2 * j, 4 + 2 * j


def view_pairs(num_documents: int) -> list[tuple[int, int]]:
    """(query view block, document view block) of every answer, in answer order."""
    return [(query_view, doc_view) for query_view in QUERY_VIEWS
            for j in range(num_documents) for doc_view in document_blocks(j)]


#: The kinds of (query view, document view) pair, "query view-document view": what the
#: training log and the reports break the matching head's loss and accuracy down by.
VIEW_KINDS = ("raw-raw", "raw-soft", "soft-raw", "soft-soft")


def pair_kinds(num_documents: int) -> list[str]:
    """The :data:`VIEW_KINDS` entry of every answer of a sample, in :func:`view_pairs` order.

    Each kind holds ``num_documents`` answers of a sample (one per document), so the kinds
    weigh the same in the matching loss."""
    raw_documents = {document_blocks(j)[0] for j in range(num_documents)}
    return [f"{'raw' if query_view == QUERY_RAW else 'soft'}-{'raw' if doc_view in raw_documents else 'soft'}"
            for query_view, doc_view in view_pairs(num_documents)]


@dataclass
class ProcessedImage:
    """One image or video already through the processor, so a matching sequence can reuse it.

    The embedding batches of a training step have decoded, resized and patched every image
    and video of the step; the matching sequences show the same ones again (raw query and
    document views), so they take these patches instead of decoding the files a second time.
    """

    pixels: torch.Tensor  # (patches, C*T*P*P)
    grid: list[int]  # (t, h, w) in patches
    source: int | None = None
    """Index of this visual input in the step's table (queries', positives', then negatives'
    images and videos, in row order), where :mod:`rematch.training.vision_cache` keeps its
    tower features; None when it came from somewhere else."""
    second_per_grid: float | None = None
    """None for an image; for a video, the seconds one temporal patch spans (its position ids)."""
    timestamps: list[float] | None = None
    """For a video, the seconds of each frame (Qwen3-VL writes them into the text)."""

    @property
    def is_video(self) -> bool:
        return self.second_per_grid is not None


@dataclass
class RawView:
    """An item's raw view in a matching sequence (``"Query: ..."`` or ``"\nDocument: ..."``), tokenised."""

    ids: list[int]
    types: list[int]  # 0 text, 1 image token, 2 video token
    image: ProcessedImage | None  # the item's image or video


@dataclass
class MatchSample:
    """A query and the documents it is matched against; ``relevant[j]`` is document j's label.

    ``views``, when given, are the raw views of [query, *documents] prepared ahead (in the
    data pipeline's threads, from already-processed images: :func:`raw_views`); without
    them the builder tokenises the items and loads their images itself.
    """

    query: Item
    documents: tuple[Item, ...]
    relevant: tuple[bool, ...]
    views: tuple[RawView, ...] | None = None


@dataclass
class MatchBatch:
    """Rows of a matching forward (packed: one per sample; reference: one per pair)."""

    input_ids: torch.Tensor  # (R, L)
    block_mask: torch.Tensor  # (R, L, L) bool, True = may attend
    position_ids: torch.Tensor  # (3, R, L)
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    image_sources: list[int | None]  # per image: its index in the step's visual table (see ProcessedImage)
    soft_rows: torch.Tensor  # (S,) row of each soft token
    soft_cols: torch.Tensor  # (S,) column of each soft token
    soft_sources: torch.Tensor  # (S,) index into the soft-embedding table (see soft_table_index)
    answer_rows: torch.Tensor  # (N,) row of each answer's last token, sample-major, pair-minor
    answer_cols: torch.Tensor  # (N,)
    labels: torch.Tensor  # (N,) 0 = "Yes", 1 = "No"
    num_samples: int
    num_documents: int
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None
    video_sources: list[int | None] = field(default_factory=list)  # per video, as image_sources

    @property
    def pairs_per_sample(self) -> int:
        return 4 * self.num_documents

    def to(self, device: torch.device | str) -> "MatchBatch":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device)
        return MatchBatch(**moved)


def soft_table_index(sample: int, slot: int, num_documents: int) -> int:
    """Row of the soft-embedding table: per sample [query, document 0, ..., document n-1]."""
    return sample * (1 + num_documents) + slot


# ---------------------------------------------------------------------------- building


@dataclass
class _Block:
    kind: int
    ids: list[int]
    types: list[int]
    images: list[ProcessedImage]
    positions: torch.Tensor  # (3, n)
    soft_slot: int | None = None  # 0 = query, 1 + j = document j
    end: int = 0  # the first position after this block

    @property
    def image_grids(self) -> list[list[int]]:
        return [image.grid for image in self.images if not image.is_video]

    @property
    def video_grids(self) -> list[list[int]]:
        return [image.grid for image in self.images if image.is_video]

    @property
    def video_seconds(self) -> list[float]:
        return [image.second_per_grid for image in self.images if image.is_video]

    def number(self, adapter: BackboneAdapter, start: int) -> tuple[torch.Tensor, int]:
        """This block's position ids from ``start`` and the next free position."""
        videos = {"video_grids": self.video_grids, "video_seconds": self.video_seconds} if self.video_grids else {}
        return adapter.block_positions(self.types, self.image_grids, start, **videos)


@dataclass
class _FixedBlocks:
    """The blocks every sample shares (prompt, soft views, answer), tokenised once per build."""

    prompt: tuple[list[int], list[int]]
    query_soft: tuple[list[int], list[int]]
    document_soft: tuple[list[int], list[int]]
    answer: tuple[list[int], list[int]]


def _fixed_blocks(adapter: BackboneAdapter, system: str, instruction: str) -> _FixedBlocks:
    texts = [adapter.chat_prefix(system) + instruction + "\n", QUERY_HEADER + adapter.soft_token,
             DOCUMENT_HEADER + adapter.soft_token, adapter.answer_prefix()]
    tokens = adapter.tokenize_blocks(texts, [])
    return _FixedBlocks(*zip(tokens.input_ids, tokens.token_types))


def raw_views(adapter: BackboneAdapter, items: Sequence[Item], header: str,
              images: Sequence[ProcessedImage | None], wheres: Sequence[str]) -> list[RawView]:
    """Tokenise items' raw views with images and videos that are already processed (no decoding,
    no resizing).

    ``images[i]`` is item i's processed image or video (None for a text-only item); ``wheres[i]``
    names the item in errors.
    """
    texts = []
    for item, image, where in zip(items, images, wheres):
        adapter.check_user_text(item, where)
        kind = "video" if item.video is not None else "image"
        if not item.has_visual and image is not None:
            raise ValueError(f"{where}: the item has no image or video but one was given")
        if item.has_visual and (image is None or image.is_video != (kind == "video")):
            raise ValueError(f"{where}: the item has {'a video' if kind == 'video' else 'an image'} but "
                             f"{'none' if image is None else 'the other kind'} was given")
        texts.append(header + adapter.content_text(item))
    present = [image for image in images if image is not None]
    tokens = adapter.tokenize_blocks_with_grids(
        texts, [image.grid for image in present if not image.is_video],
        **_video_grids_argument([image for image in present if image.is_video])) if texts else None
    return [RawView(ids, types, image) for ids, types, image
            in zip(tokens.input_ids, tokens.token_types, images)] if tokens else []


def _video_grids_argument(videos: list[ProcessedImage]) -> dict:
    """``video_grids=`` (and the frame times) only when there are videos: a family without a video
    path keeps working."""
    if not videos:
        return {}
    times = [video.timestamps for video in videos]
    return {"video_grids": [video.grid for video in videos],
            **({"video_timestamps": times} if all(time is not None for time in times) else {})}


def _split_visuals(pixels: torch.Tensor | None, grid_thw: torch.Tensor | None, rows: int, name: str
                   ) -> list[tuple[torch.Tensor, list[int]]]:
    grids = [list(map(int, grid)) for grid in grid_thw.tolist()] if grid_thw is not None else []
    if len(grids) != rows:
        raise ValueError(f"{rows} rows with {name} tokens but {len(grids)} {name}s in the batch")
    return list(zip(torch.split(pixels, [t * h * w for t, h, w in grids]), grids)) if grids else []


def processed_images(batch: EncoderBatch, first_source: int = 0) -> list[ProcessedImage | None]:
    """Each row's image or video as the embedding batch already processed it (None for a text-only row).

    ``first_source`` is the step-table index of this batch's first visual input (see
    :attr:`ProcessedImage.source`); images and videos share the table, in row order.
    """
    kinds = batch.visual_kinds()
    images = iter(_split_visuals(batch.pixel_values, batch.image_grid_thw, kinds.count(IMAGE), "image"))
    videos = iter(_split_visuals(batch.pixel_values_videos, batch.video_grid_thw, kinds.count(VIDEO), "video"))
    seconds = iter(batch.second_per_grid_ts or [])
    times = iter(batch.video_timestamps or [])
    processed: list[ProcessedImage | None] = []
    source = first_source
    for kind in kinds:
        if kind == IMAGE:
            pixels, grid = next(images)
            processed.append(ProcessedImage(pixels, grid, source))
        elif kind == VIDEO:
            pixels, grid = next(videos)
            second = next(seconds, None)
            if second is None:
                raise ValueError("a video row without its second_per_grid_ts in the batch")
            processed.append(ProcessedImage(pixels, grid, source, second_per_grid=float(second),
                                            timestamps=next(times, None)))
        else:
            processed.append(None)
            continue
        source += 1
    return processed


@dataclass
class MatchingViews:
    """The raw views of every query, positive and negative of a training batch, tokenised.

    Built once per batch (in the data pipeline's threads when the collator is asked to),
    from the images the embedding batches already processed; a matching sample is then a
    choice of three of them, whether its negative is the row's own or another row's positive.
    """

    queries: list[RawView]
    positives: list[RawView]
    negatives: list[RawView]


def training_views(adapter: BackboneAdapter, query_items: Sequence[Item], queries: EncoderBatch,
                   positive_items: Sequence[Item], positives: EncoderBatch, negative_items: Sequence[Item],
                   negatives: EncoderBatch | None, negative_owner: Sequence[int]) -> MatchingViews:
    """:class:`MatchingViews` of one training batch; sources number the step's visual table
    (images and videos) in the order queries, positives, negatives."""
    query_images = processed_images(queries, 0)
    positive_images = processed_images(positives, sum(image is not None for image in query_images))
    first_negative = sum(image is not None for image in query_images + positive_images)
    negative_images = processed_images(negatives, first_negative) if negatives is not None else []
    if len(negative_images) != len(negative_items):
        raise ValueError(f"{len(negative_items)} negative items but {len(negative_images)} prepared negatives")
    return MatchingViews(
        queries=raw_views(adapter, query_items, QUERY_HEADER, query_images,
                          [f"query {i}" for i in range(len(query_items))]),
        positives=raw_views(adapter, positive_items, DOCUMENT_HEADER, positive_images,
                            [f"positive {i}" for i in range(len(positive_items))]),
        negatives=raw_views(adapter, negative_items, DOCUMENT_HEADER, negative_images,
                            [f"negative {owner}" for owner in negative_owner]),
    )


def _loaded_views(adapter: BackboneAdapter, sample: MatchSample, where: str) -> list[RawView]:
    """Raw views of a sample that came without them: load its images and videos and run the processor."""
    owners = [sample.query, *sample.documents]
    roles = ["query"] + [f"document {j}" for j in range(len(sample.documents))]
    for item, role in zip(owners, roles):
        adapter.check_user_text(item, f"{where} ({role})")
    texts = [QUERY_HEADER + adapter.content_text(sample.query)]
    texts += [DOCUMENT_HEADER + adapter.content_text(document) for document in sample.documents]
    images = [adapter.load_image(item.image, f"{where} ({role})")
              for item, role in zip(owners, roles) if item.image is not None]
    videos = [adapter.load_video(item.video, f"{where} ({role})")
              for item, role in zip(owners, roles) if item.video is not None]
    tokens = adapter.tokenize_blocks(texts, images, videos) if videos else adapter.tokenize_blocks(texts, images)
    pixel_chunks = (list(torch.split(tokens.pixel_values, tokens.patches_per_image))
                    if tokens.pixel_values is not None else [])
    video_chunks = (list(torch.split(tokens.pixel_values_videos, tokens.patches_per_video))
                    if getattr(tokens, "pixel_values_videos", None) is not None else [])
    processed = {IMAGE: iter([ProcessedImage(pixels, grid) for pixels, grid in zip(pixel_chunks, tokens.image_grids)]),
                 VIDEO: iter([ProcessedImage(pixels, grid, second_per_grid=second, timestamps=times)
                              for pixels, grid, second, times in zip(video_chunks, tokens.video_grids,
                                                                     tokens.video_seconds, tokens.video_timestamps)])}
    views = []
    for ids, types in zip(tokens.input_ids, tokens.token_types):
        visual_runs = [t for t in _runs(types) if t in (IMAGE, VIDEO)]
        # an image is one run of tokens; a video may be several (Qwen3-VL: one per temporal patch)
        if len(set(visual_runs)) > 1 or visual_runs.count(IMAGE) > 1:
            raise ValueError(f"{where}: a view holds {len(visual_runs)} images or videos; one per item is supported")
        views.append(RawView(ids, types, next(processed[visual_runs[0]]) if visual_runs else None))
    return views


def _sample_blocks(adapter: BackboneAdapter, sample: MatchSample, fixed: _FixedBlocks,
                   where: str) -> tuple[list[_Block], _Block]:
    """One sample's content blocks (numbered) and its answer block (numbered per pair later)."""
    views = list(sample.views) if sample.views is not None else _loaded_views(adapter, sample, where)
    if len(views) != 1 + len(sample.documents):
        raise ValueError(f"{where}: {len(views)} prepared views for a query and {len(sample.documents)} documents")

    def raw(kind: int, view: RawView) -> _Block:
        return _Block(kind, view.ids, view.types, [view.image] if view.image is not None else [], torch.empty(0))

    def fixed_block(kind: int, tokens: tuple[list[int], list[int]], soft_slot: int | None = None) -> _Block:
        return _Block(kind, tokens[0], tokens[1], [], torch.empty(0), soft_slot)

    blocks = [fixed_block(PROMPT, fixed.prompt), raw(QUERY_RAW, views[0]),
              fixed_block(QUERY_SOFT, fixed.query_soft, soft_slot=0)]
    for j, view in enumerate(views[1:]):
        raw_kind, soft_kind = document_blocks(j)
        blocks += [raw(raw_kind, view), fixed_block(soft_kind, fixed.document_soft, soft_slot=1 + j)]
    answer = fixed_block(ANSWER_KIND, fixed.answer)
    _assign_positions(adapter, blocks)
    return blocks, answer


def _runs(types: Sequence[int]) -> list[int]:
    runs, previous = [], None
    for value in types:
        if value != previous:
            runs.append(value)
            previous = value
    return runs


def _assign_positions(adapter: BackboneAdapter, blocks: list[_Block]) -> None:
    """Number the content blocks (see the module docstring); answers are numbered per pair."""
    prompt = blocks[0]
    prompt.positions, prompt.end = prompt.number(adapter, 0)
    for block in blocks[1:3]:
        block.positions, block.end = block.number(adapter, prompt.end)
    document_start = max(block.end for block in blocks[1:3])
    for block in blocks[3:]:
        block.positions, block.end = block.number(adapter, document_start)


def _visibility(kinds_of_rows: list[list[int]], answer_pairs: dict[int, tuple[int, int]], length: int,
                pad_id_rows: list[int]) -> torch.Tensor:
    """Boolean (R, L, L) mask from per-token block kinds (answers have kinds >= ANSWER_KIND)."""
    masks = []
    for kinds, row_length in zip(kinds_of_rows, pad_id_rows):
        kind = torch.tensor(kinds + [PAD_BLOCK] * (length - row_length))
        same = kind[:, None] == kind[None, :]
        sees_prompt = (kind[None, :] == PROMPT) & (kind[:, None] != PAD_BLOCK)
        allowed = same | sees_prompt
        for answer_kind, (query_view, doc_view) in answer_pairs.items():
            rows = kind == answer_kind
            if rows.any():
                allowed[rows] |= (kind == query_view) | (kind == doc_view)
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        allowed = (allowed & causal) | torch.eye(length, dtype=torch.bool)
        allowed[:, kind == PAD_BLOCK] &= torch.eye(length, dtype=torch.bool)[:, kind == PAD_BLOCK]
        masks.append(allowed)
    return torch.stack(masks)


def _assemble(rows: list[list[_Block]], soft_entries, answer_entries, labels, num_samples: int,
              num_documents: int, pad_id: int, answer_pairs: dict[int, tuple[int, int]]) -> MatchBatch:
    length = max(sum(len(block.ids) for block in row) for row in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    position_ids = torch.zeros((3, len(rows), length), dtype=torch.long)
    kinds_of_rows, lengths, images = [], [], []
    for r, row in enumerate(rows):
        ids = [t for block in row for t in block.ids]
        input_ids[r, :len(ids)] = torch.tensor(ids)
        position_ids[:, r, :len(ids)] = torch.cat([block.positions for block in row], dim=1)
        kinds_of_rows.append([block.kind for block in row for _ in block.ids])
        lengths.append(len(ids))
        for block in row:
            images += block.images
    soft_rows, soft_cols, soft_sources = (torch.tensor(v, dtype=torch.long) for v in zip(*soft_entries)) \
        if soft_entries else (torch.zeros(0, dtype=torch.long),) * 3
    answer_rows, answer_cols = (torch.tensor(v, dtype=torch.long) for v in zip(*answer_entries))
    videos = [image for image in images if image.is_video]
    images = [image for image in images if not image.is_video]
    return MatchBatch(
        input_ids=input_ids,
        block_mask=_visibility(kinds_of_rows, answer_pairs, length, lengths),
        position_ids=position_ids,
        pixel_values=torch.cat([image.pixels for image in images]) if images else None,
        image_grid_thw=torch.tensor([image.grid for image in images], dtype=torch.long) if images else None,
        image_sources=[image.source for image in images],
        pixel_values_videos=torch.cat([video.pixels for video in videos]) if videos else None,
        video_grid_thw=torch.tensor([video.grid for video in videos], dtype=torch.long) if videos else None,
        video_sources=[video.source for video in videos],
        soft_rows=soft_rows, soft_cols=soft_cols, soft_sources=soft_sources,
        answer_rows=answer_rows, answer_cols=answer_cols,
        labels=torch.tensor(labels, dtype=torch.long),
        num_samples=num_samples, num_documents=num_documents,
    )


def _check_samples(samples: Sequence[MatchSample]) -> int:
    if not samples:
        raise ValueError("no samples to match")
    counts = {len(sample.documents) for sample in samples}
    if len(counts) != 1 or 0 in counts:
        raise ValueError(f"every sample needs the same, non-zero number of documents; got {sorted(counts)}")
    for sample in samples:
        if len(sample.relevant) != len(sample.documents):
            raise ValueError("relevant must give one label per document")
    return counts.pop()


def _labels(sample: MatchSample, pairs: list[tuple[int, int]]) -> list[int]:
    return [0 if sample.relevant[(doc_view - 3) // 2] else 1 for _, doc_view in pairs]


def _answer_block(adapter: BackboneAdapter, answer: _Block, pair: int, document_view: _Block) -> _Block:
    """Pair ``pair``'s answer block, numbered from the end of its own document view."""
    positions, end = answer.number(adapter, document_view.end)
    return _Block(ANSWER_KIND + pair, answer.ids, answer.types, [], positions, end=end)


def _finish(adapter: BackboneAdapter, samples: Sequence[MatchSample], rows: list[list[_Block]],
            row_samples: list[int], num_documents: int) -> MatchBatch:
    """Locate every soft token and answer in the rows, and assemble the batch."""
    pairs = view_pairs(num_documents)
    soft_entries, answer_entries = [], []
    for r, (row, s) in enumerate(zip(rows, row_samples)):
        column = 0
        for block in row:
            column += len(block.ids)
            if block.soft_slot is not None:
                soft_entries.append((r, column - 1, soft_table_index(s, block.soft_slot, num_documents)))
            if block.kind >= ANSWER_KIND:
                answer_entries.append((r, column - 1))
    labels = [label for sample in samples for label in _labels(sample, pairs)]
    answer_pairs = {ANSWER_KIND + p: pair for p, pair in enumerate(pairs)}
    return _assemble(rows, soft_entries, answer_entries, labels, len(samples), num_documents,
                     adapter.tokenizer.pad_token_id, answer_pairs)


def build_packed_batch(adapter: BackboneAdapter, samples: Sequence[MatchSample], system: str,
                       instruction: str, where: str = "sample") -> MatchBatch:
    """One packed row per sample (content encoded once, all pairs answered in the same row)."""
    num_documents = _check_samples(samples)
    fixed = _fixed_blocks(adapter, system, instruction)
    rows = []
    for s, sample in enumerate(samples):
        blocks, answer = _sample_blocks(adapter, sample, fixed, f"{where} {s}")
        by_kind = {block.kind: block for block in blocks}
        rows.append(blocks + [_answer_block(adapter, answer, p, by_kind[doc_view])
                              for p, (_, doc_view) in enumerate(view_pairs(num_documents))])
    return _finish(adapter, samples, rows, list(range(len(samples))), num_documents)


def build_reference_batch(adapter: BackboneAdapter, samples: Sequence[MatchSample], system: str,
                          instruction: str, where: str = "sample") -> MatchBatch:
    """The simple reference: every (query view, document view) pair as its own row.

    Rows use the packed layout's position ids and block visibility, so their answers
    must equal the packed forward's (the test of the packing).
    """
    num_documents = _check_samples(samples)
    fixed = _fixed_blocks(adapter, system, instruction)
    rows, row_samples = [], []
    for s, sample in enumerate(samples):
        blocks, answer = _sample_blocks(adapter, sample, fixed, f"{where} {s}")
        by_kind = {block.kind: block for block in blocks}
        for p, (query_view, doc_view) in enumerate(view_pairs(num_documents)):
            rows.append([by_kind[PROMPT], by_kind[query_view], by_kind[doc_view],
                         _answer_block(adapter, answer, p, by_kind[doc_view])])
            row_samples.append(s)
    return _finish(adapter, samples, rows, row_samples, num_documents)


# ---------------------------------------------------------------------------- forward


def matching_inputs(model, batch: MatchBatch, soft_embeddings: torch.Tensor,
                    image_features: Sequence[torch.Tensor] | None = None) -> tuple[torch.Tensor, DeepStack | None]:
    """The input embeddings (R, L, H) of a matching batch, soft tokens in place, and the
    backbone's deepstack features (Qwen3-VL; None otherwise).

    ``soft_embeddings`` holds the L2-normalised embeddings per sample in the order
    [query, document 0, ..., document n-1] (see :func:`soft_table_index`); they pass
    through the projector here, so the matching loss trains the embeddings too.
    ``image_features`` is the step's table of precomputed tower outputs per image or video
    (frozen tower, :mod:`rematch.training.vision_cache`): when every image (video) of the batch
    has an entry there, the tower does not run on the images (videos) again. ``batch`` must be
    on the model's device.
    """
    adapter = model.adapter

    def looked_up(sources: list[int | None]) -> torch.Tensor | None:
        if image_features is None or not sources or any(source is None for source in sources):
            return None
        return torch.cat([image_features[source] for source in sources])

    video_inputs = {}
    if batch.pixel_values_videos is not None:
        video_inputs = {"pixel_values_videos": batch.pixel_values_videos, "video_grid_thw": batch.video_grid_thw,
                        "video_features": looked_up(batch.video_sources)}
    embeds, deepstack = adapter.embed_inputs(model.backbone, batch.input_ids, batch.pixel_values,
                                             batch.image_grid_thw, image_features=looked_up(batch.image_sources),
                                             **video_inputs)
    if batch.soft_sources.numel():
        soft = model.project(soft_embeddings)[batch.soft_sources].to(embeds.dtype)
        embeds = embeds.index_put((batch.soft_rows, batch.soft_cols), soft)
    return embeds, deepstack


def answer_states(model, batch: MatchBatch, soft_embeddings: torch.Tensor,
                  image_features: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """The final states (N, H) at the answer positions of a matching batch (sample-major,
    pair-minor), from which the answer's logits are read (:func:`matching_inputs` for the arguments).

    Only these N states go through the LM head, never the whole sequence: the Yes/No rows
    for reranking and the 2-way loss, the full vocabulary for the generative loss."""
    batch = batch.to(model.device)
    embeds, deepstack = matching_inputs(model, batch, soft_embeddings, image_features)
    # a 4-D boolean mask: the adapter runs it on a kernel that takes one (sdpa/eager), whatever
    # the embedding forward uses (rematch.backbones.attention)
    hidden = model.adapter.language_model(model.backbone, embeds, batch.block_mask[:, None], batch.position_ids,
                                          deepstack=deepstack)
    return hidden[batch.answer_rows, batch.answer_cols]


def match_logits(model, batch: MatchBatch, soft_embeddings: torch.Tensor,
                 image_features: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """Yes/No logits (num_samples, 4 * num_documents, 2) of a matching batch (see :func:`answer_states`)."""
    logits = model.answer_logits(answer_states(model, batch, soft_embeddings, image_features))
    return logits.view(batch.num_samples, batch.pairs_per_sample, 2)
