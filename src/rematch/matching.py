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
Qwen's 3-D M-RoPE ids are used inside image blocks. The reference implementation
(:func:`build_reference_batch`) runs each pair as its own sequence with exactly those
positions and the same block visibility; tests check both give the same logits.

Why not reuse the content states of the embedding forward instead? It would make
matching almost free, but it needs the key/value states of that forward, which gradient
checkpointing (required for real models) does not keep. The packed sequence is a plain
forward with a mask, so it composes with checkpointing, LoRA, bf16 and DDP; its cost is
controlled by matching only a sub-batch per step (see the trainer's ``matching_samples``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import torch

from rematch.backbones.base import BackboneAdapter
from rematch.data.images import load_image_for_model
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


@dataclass
class MatchSample:
    """A query and the documents it is matched against; ``relevant[j]`` is document j's label."""

    query: Item
    documents: tuple[Item, ...]
    relevant: tuple[bool, ...]


@dataclass
class MatchBatch:
    """Rows of a matching forward (packed: one per sample; reference: one per pair)."""

    input_ids: torch.Tensor  # (R, L)
    block_mask: torch.Tensor  # (R, L, L) bool, True = may attend
    position_ids: torch.Tensor  # (3, R, L)
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    soft_rows: torch.Tensor  # (S,) row of each soft token
    soft_cols: torch.Tensor  # (S,) column of each soft token
    soft_sources: torch.Tensor  # (S,) index into the soft-embedding table (see soft_table_index)
    answer_rows: torch.Tensor  # (N,) row of each answer's last token, sample-major, pair-minor
    answer_cols: torch.Tensor  # (N,)
    labels: torch.Tensor  # (N,) 0 = "Yes", 1 = "No"
    num_samples: int
    num_documents: int

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
    grids: list[list[int]]
    pixels: list[torch.Tensor]
    positions: torch.Tensor  # (3, n)
    soft_slot: int | None = None  # 0 = query, 1 + j = document j
    end: int = 0  # the first position after this block


def _sample_blocks(adapter: BackboneAdapter, sample: MatchSample, system: str, instruction: str,
                   where: str) -> tuple[list[_Block], _Block]:
    """Tokenise one sample's content blocks and its answer block, and number their positions."""
    for item, role in zip([sample.query, *sample.documents], ["query"] + [f"document {j}" for j in
                                                                         range(len(sample.documents))]):
        adapter.check_user_text(item, f"{where} ({role})")
    texts = [adapter.chat_prefix(system) + instruction + "\n",
             QUERY_HEADER + adapter.content_text(sample.query), QUERY_HEADER + adapter.soft_token]
    for document in sample.documents:
        texts += [DOCUMENT_HEADER + adapter.content_text(document), DOCUMENT_HEADER + adapter.soft_token]
    texts.append(adapter.answer_prefix())
    owners = [sample.query, *sample.documents]
    config = adapter.config
    images = [load_image_for_model(item.image, config.min_pixels, config.max_pixels, where=f"{where} ({role})")
              for item, role in zip(owners, ["query"] + [f"document {j}" for j in range(len(owners) - 1)])
              if item.image is not None]
    tokens = adapter.tokenize_blocks(texts, images)
    pixel_chunks = (list(torch.split(tokens.pixel_values, tokens.patches_per_image))
                    if tokens.pixel_values is not None else [])
    grids = iter(zip(tokens.image_grids, pixel_chunks))
    kinds = [PROMPT, *QUERY_VIEWS]
    for j in range(len(sample.documents)):
        kinds += list(document_blocks(j))
    blocks: list[_Block] = []
    for index, kind in enumerate(kinds):
        n_images = sum(1 for t in _runs(tokens.token_types[index]) if t == 1)
        taken = [next(grids) for _ in range(n_images)]
        soft_slot = None
        if kind == QUERY_SOFT:
            soft_slot = 0
        elif kind >= 3 and (kind - 3) % 2 == 1:
            soft_slot = 1 + (kind - 3) // 2
        blocks.append(_Block(kind, tokens.input_ids[index], tokens.token_types[index], [g for g, _ in taken],
                             [p for _, p in taken], torch.empty(0), soft_slot))
    answer = _Block(ANSWER_KIND, tokens.input_ids[-1], tokens.token_types[-1], [], [], torch.empty(0))
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
    prompt.positions, prompt.end = adapter.block_positions(prompt.types, prompt.grids, 0)
    for block in blocks[1:3]:
        block.positions, block.end = adapter.block_positions(block.types, block.grids, prompt.end)
    document_start = max(block.end for block in blocks[1:3])
    for block in blocks[3:]:
        block.positions, block.end = adapter.block_positions(block.types, block.grids, document_start)


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
    kinds_of_rows, lengths, grids, pixels = [], [], [], []
    for r, row in enumerate(rows):
        ids = [t for block in row for t in block.ids]
        input_ids[r, :len(ids)] = torch.tensor(ids)
        position_ids[:, r, :len(ids)] = torch.cat([block.positions for block in row], dim=1)
        kinds_of_rows.append([block.kind for block in row for _ in block.ids])
        lengths.append(len(ids))
        for block in row:
            grids += block.grids
            pixels += block.pixels
    soft_rows, soft_cols, soft_sources = (torch.tensor(v, dtype=torch.long) for v in zip(*soft_entries)) \
        if soft_entries else (torch.zeros(0, dtype=torch.long),) * 3
    answer_rows, answer_cols = (torch.tensor(v, dtype=torch.long) for v in zip(*answer_entries))
    return MatchBatch(
        input_ids=input_ids,
        block_mask=_visibility(kinds_of_rows, answer_pairs, length, lengths),
        position_ids=position_ids,
        pixel_values=torch.cat(pixels) if pixels else None,
        image_grid_thw=torch.tensor(grids, dtype=torch.long) if grids else None,
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
    positions, end = adapter.block_positions(answer.types, answer.grids, document_view.end)
    return _Block(ANSWER_KIND + pair, answer.ids, answer.types, [], [], positions, end=end)


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
    rows = []
    for s, sample in enumerate(samples):
        blocks, answer = _sample_blocks(adapter, sample, system, instruction, f"{where} {s}")
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
    rows, row_samples = [], []
    for s, sample in enumerate(samples):
        blocks, answer = _sample_blocks(adapter, sample, system, instruction, f"{where} {s}")
        by_kind = {block.kind: block for block in blocks}
        for p, (query_view, doc_view) in enumerate(view_pairs(num_documents)):
            rows.append([by_kind[PROMPT], by_kind[query_view], by_kind[doc_view],
                         _answer_block(adapter, answer, p, by_kind[doc_view])])
            row_samples.append(s)
    return _finish(adapter, samples, rows, row_samples, num_documents)


# ---------------------------------------------------------------------------- forward


def attention_mask_for(block_mask: torch.Tensor, attn_implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """The (R, 1, L, L) mask in the form the attention kernel takes (bool for sdpa, additive for eager)."""
    mask = block_mask[:, None]
    if attn_implementation == "sdpa":
        return mask
    if attn_implementation == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    raise ValueError(f"the matching forward needs a 4-D mask: use attn_implementation sdpa or eager, "
                     f"not {attn_implementation!r}")


def match_logits(model, batch: MatchBatch, soft_embeddings: torch.Tensor) -> torch.Tensor:
    """Yes/No logits (num_samples, 4 * num_documents, 2) of a matching batch.

    ``soft_embeddings`` holds the L2-normalised embeddings per sample in the order
    [query, document 0, ..., document n-1] (see :func:`soft_table_index`); they pass
    through the projector here, so the matching loss trains the embeddings too.
    """
    batch = batch.to(model.device)
    adapter = model.adapter
    embeds = adapter.input_embeddings(model.backbone, batch.input_ids, batch.pixel_values, batch.image_grid_thw)
    if batch.soft_sources.numel():
        soft = model.project(soft_embeddings)[batch.soft_sources].to(embeds.dtype)
        embeds = embeds.index_put((batch.soft_rows, batch.soft_cols), soft)
    mask = attention_mask_for(batch.block_mask, model.config.attn_implementation, embeds.dtype)
    hidden = adapter.language_model(model.backbone, embeds, mask, batch.position_ids)
    answers = hidden[batch.answer_rows, batch.answer_cols]
    logits = model.answer_logits(answers)
    return logits.view(batch.num_samples, batch.pairs_per_sample, 2)
