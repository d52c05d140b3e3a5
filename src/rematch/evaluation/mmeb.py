"""The MMEB evaluation protocol: rank each query's own candidate list, candidate 0 is correct.

For each subset:

1. Deduplicate: every distinct query item (by ``Item.cache_key()``) is embedded once as a
   query, every distinct candidate item once as a document — MMEB candidate lists share
   most of their items (class labels, answer strings, image pools), so this is usually a
   10-1000x saving.
2. Encode through :class:`~rematch.encoding.cache.CachedEncoder` (on-disk cache, and
   strided shards across ranks when ``torch.distributed`` is initialised); candidates
   without an instruction get their subset's document instruction first
   (:func:`rematch.instructions.document_items`, if the model's config turns them on).
3. Score every query against its own list (cosine = dot product of normalised vectors)
   and rank it. ``hit@1`` (MMEB's Precision@1), ``hit@5`` and ``mrr`` follow the official
   MMEB rule: the scripts take ``argmax`` of the scores, which returns the first maximum,
   and the answer is candidate 0, so an exact tie with the answer is a hit (the
   ``list_order`` rule of :mod:`rematch.evaluation.metrics`). ``hit@1_strict`` is reported
   beside it with the pessimistic rule, where such a tie is a miss; ``ties_at_top`` counts
   the queries on which the two differ, ``positive_duplicates`` the lists that repeat the
   answer (the usual cause: ImageNet-style label lists).

With ``rerank`` N the matching head reorders each query's top N (``hit@1`` etc. are then the
reranked ones), and ``rerank_auc`` says how well its p(Yes) separates the positive from the
reranked negatives, pooled over the subset's queries (:class:`RerankSeparation`).

Input limits (image pixels, text tokens) are evaluation settings: ``limits`` applies them
for the run (:mod:`rematch.evaluation.settings`) and every result records them.

Scores are fractions in [0, 1] in every JSON file; the Markdown report and the plot
show percentages, as the MMEB tables do.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from rematch.data.images import ImageLoadError
from rematch.data.items import Item, as_item
from rematch.data.mmeb_subsets import SubsetInfo, read_manifest_subsets, subset_info
from rematch.data.records import EvalExample, RowRef
from rematch.encoding.cache import CachedEncoder, EncodeStats
from rematch.distributed import is_main_process
from rematch.encoding.distributed import encode_across_ranks, gather_stats
from rematch.evaluation.metrics import check_finite, hit_at_k, mean_metrics, per_query_metrics, ranks_of_relevant
from rematch.evaluation.settings import (
    InputLimits, current_limits, input_limits, limits_preset, model_config_of, with_target_prompt_style)
from rematch.instructions import document_items
from rematch.atomic import write_json_atomically
from rematch.retrieval.rerank import check_rerank, rerank_query
from rematch.training.answers import separation_auc

#: Score-matrix chunks are kept under this many floats (queries x unique candidates).
_SCORE_BLOCK = 1 << 23

#: The tie rule of hit@1, hit@5 and MRR (the official MMEB one), recorded in every result.
TIE_RULE = "official"
#: How exact ties are ordered under each reported rule (names of metrics.TIE_RULES).
_OFFICIAL_TIES, _STRICT_TIES = "list_order", "pessimistic"


class EvalDataError(ValueError):
    """An evaluation example cannot be used; the message names the file, row and field."""


@dataclass
class DedupedSubset:
    """A subset's examples reduced to unique items plus index lists into them."""

    name: str
    queries: list[Item] = field(default_factory=list)
    candidates: list[Item] = field(default_factory=list)
    query_index: list[int] = field(default_factory=list)
    candidate_lists: list[np.ndarray] = field(default_factory=list)
    positive_duplicates: int = 0
    """Examples whose list holds another candidate identical to the correct one (an exact tie)."""
    first_seen: dict[tuple[str, int], str] = field(default_factory=dict)
    """(role, unique index) -> the first row (file, row, field) that uses that item."""

    def row_using_image(self, role: str, path: str) -> str | None:
        """The first row whose ``role`` item (query or document) shows the image file ``path``."""
        items = self.queries if role == "query" else self.candidates
        for index, item in enumerate(items):
            if isinstance(item.image, (str, os.PathLike)) and str(item.image) == path:
                return self.first_seen[(role, index)]
        return None

    def __len__(self) -> int:
        return len(self.query_index)


def _where(ref: RowRef | None, subset: str, number: int) -> str:
    return str(ref) if ref is not None else f"{subset} example {number}"


def dedupe_examples(name: str, examples: Iterable[EvalExample]) -> DedupedSubset:
    """Validate examples and map every query and candidate to a unique-item index.

    Streaming: only unique items and integer index lists are kept, so a subset of 1000
    queries x 1000 candidates does not hold a million Item objects.
    """
    data = DedupedSubset(name)
    query_ids: dict[str, int] = {}
    candidate_ids: dict[str, int] = {}
    first_seen = data.first_seen
    for number, example in enumerate(examples):
        if not isinstance(example, EvalExample):
            raise EvalDataError(f"{name} example {number}: expected an EvalExample, got {type(example).__name__}")
        where = _where(example.ref, name, number)
        if not example.candidates:
            raise EvalDataError(f"{where}: field 'candidates' is empty; MMEB needs candidate 0 to be the answer")
        data.query_index.append(_intern(example.query, query_ids, data.queries, first_seen, "query", where, 0))
        indices = np.empty(len(example.candidates), dtype=np.int64)
        for position, candidate in enumerate(example.candidates):
            indices[position] = _intern(candidate, candidate_ids, data.candidates, first_seen, "document", where,
                                        position)
        if (indices[1:] == indices[0]).any():
            data.positive_duplicates += 1
        data.candidate_lists.append(indices)
    if not data.query_index:
        raise EvalDataError(f"subset {name}: no examples")
    _check_images(data.queries, "query", first_seen)
    _check_images(data.candidates, "document", first_seen)
    return data


def _intern(item, ids: dict[str, int], items: list[Item], first_seen: dict, role: str, where: str,
            position: int) -> int:
    """Index of ``item`` among the unique items, adding it (validated) on first sight.

    Validation runs once per unique item: MMEB lists repeat the same few thousand items
    a million times, so this keeps deduplication at about a microsecond per candidate.
    """
    raw_key = item.cache_key() if isinstance(item, Item) else None
    index = ids.get(raw_key) if raw_key is not None else None
    if index is None:
        label = "query" if role == "query" else "candidate"
        item = as_item(item, position, f"{where}: {label}")
        key = item.cache_key()  # of the validated item (validation may normalise it)
        index = ids.get(key)
        if index is None:
            index = ids[key] = len(items)
            items.append(item)
            first_seen[(role, index)] = f"{where}: {label}" + (f" {position}" if role != "query" else "")
        if raw_key is not None:
            ids[raw_key] = index
    return index


@contextlib.contextmanager
def _errors_named_by_row(data: DedupedSubset, role: str):
    """Turn an image that fails while encoding into an error naming the row that uses it.

    The encoder sees deduplicated items, so its own message can only say "item 17"; the
    user needs the file, row and field, and the flag that skips such rows.
    """
    try:
        yield
    except ImageLoadError as error:
        row = data.row_using_image(role, error.path) if error.path is not None else None
        if row is None:
            raise
        reason = str(error).split(": ", 1)[-1]
        raise EvalDataError(f"{row}: field 'image': {reason} (--skip-bad / skip_bad=True skips rows whose "
                            "image cannot be read)") from error


def _check_images(items: Sequence[Item], role: str, first_seen: dict) -> None:
    """Fail before encoding if an image file is missing, naming the first row that uses it."""
    for index, item in enumerate(items):
        if isinstance(item.image, (str, os.PathLike)) and not os.path.isfile(item.image):
            raise EvalDataError(f"{first_seen[(role, index)]}: field 'image': image file not found: {item.image}")


def score_lists(data: DedupedSubset, query_vectors: np.ndarray, candidate_vectors: np.ndarray) -> np.ndarray:
    """(n_examples, longest list) cosine scores of each query against its own list, -inf padded."""
    longest = max(len(indices) for indices in data.candidate_lists)
    scores = np.full((len(data), longest), -np.inf, dtype=np.float64)
    chunk = max(1, _SCORE_BLOCK // max(1, len(data.candidates)))
    query_index = np.asarray(data.query_index)
    for start in range(0, len(data), chunk):
        stop = min(len(data), start + chunk)
        block = query_vectors[query_index[start:stop]] @ candidate_vectors.T
        for row in range(start, stop):
            indices = data.candidate_lists[row]
            scores[row, :len(indices)] = block[row - start, indices]
    check_finite(np.where(np.isneginf(scores), 0.0, scores), f"{data.name} scores")
    return scores


def evaluate_subset(encoder: CachedEncoder, name: str, examples: Iterable[EvalExample],
                    ks: Sequence[int] = (1, 5), rerank: int = 0, info: SubsetInfo | None = None) -> dict:
    """Metrics of one subset (a JSON-ready dict; see the module docstring for the protocol)."""
    start = time.perf_counter()
    config = model_config_of(encoder.model)
    data = dedupe_examples(name, examples)
    with _errors_named_by_row(data, "query"):
        query_vectors = encode_across_ranks(encoder, data.queries, "query")
    # ---- Document side: the single place the candidates are prepared for encoding. ----
    # Candidates without an instruction of their own get the subset's document instruction
    # (rematch.instructions; unchanged when the model's config turns them off). The reranker
    # below reads `documents` too, so both stages see the same items.
    documents = document_items(data.candidates, name, config)
    with _errors_named_by_row(data, "document"):
        candidate_vectors = encode_across_ranks(encoder, documents, "document")
    scores = score_lists(data, query_vectors, candidate_vectors)
    rerank_auc = None
    if rerank:
        separation = RerankSeparation()
        for row, indices in enumerate(data.candidate_lists):
            query = data.queries[data.query_index[row]]
            candidates = [documents[i] for i in indices]
            reranked = rerank_query(
                encoder.model, query, candidates, scores[row, :len(indices)], rerank,
                query_embedding=query_vectors[data.query_index[row]], candidate_embeddings=candidate_vectors[indices],
                also_score=(0,))  # the positive, to compare with the reranked negatives wherever it ranked
            scores[row, :len(indices)] = reranked.scores
            separation.add(reranked.probabilities, indices)
        rerank_auc = separation.auc()
    answer = np.zeros((len(data), 1), dtype=np.int64)  # MMEB: candidate 0 is the correct one
    ranks = ranks_of_relevant(scores, answer, ties=_OFFICIAL_TIES)
    strict_ranks = ranks_of_relevant(scores, answer, ties=_STRICT_TIES)
    metrics = mean_metrics(per_query_metrics(ranks, hit_ks=ks))
    metrics = {"hit@1": metrics.pop("hit@1"), "hit@1_strict": float(hit_at_k(strict_ranks, 1).mean()), **metrics}
    ties_at_top = int(((ranks.ranks[:, 0] == 1) & (strict_ranks.ranks[:, 0] > 1)).sum())
    info = info or subset_info(name)
    lengths = np.array([len(indices) for indices in data.candidate_lists])
    return {
        "subset": name,
        "meta_task": info.meta_task,
        "split": info.split,
        "count": len(data),
        **{key: round(value, 6) for key, value in metrics.items()},
        "candidates_per_query": {"min": int(lengths.min()), "max": int(lengths.max()),
                                 "mean": round(float(lengths.mean()), 2)},
        "unique_queries": len(data.queries),
        "unique_candidates": len(data.candidates),
        "positive_duplicates": data.positive_duplicates,
        "ties_at_top": ties_at_top,
        "tie_rule": TIE_RULE,
        "rerank": rerank,
        **({"rerank_auc": rerank_auc} if rerank else {}),
        "seconds": round(time.perf_counter() - start, 3),
    }


@dataclass
class RerankSeparation:
    """How well the matching head's p(Yes) separates each query's positive (candidate 0) from
    the negatives it reranked, pooled over a subset's queries: ``rerank_auc``.

    Why beside hit@1: a reranked hit@1 mixes the head with the first stage (the head only
    reorders the top N); the AUC is the head alone, 0.5 for a head at chance (p(Yes) the same
    for every candidate, as an untrained head or one stuck at ln 2 gives), 1.0 for one that
    puts every positive above every reranked negative. The negatives are the top N's
    candidates other than the positive (a duplicate of the positive in the list is the
    positive); a positive outside the top N is scored too, so every query counts.
    """

    positives: list[float] = field(default_factory=list)
    negatives: list[float] = field(default_factory=list)

    def add(self, probabilities: Mapping[int, float], candidate_ids: Sequence[int]) -> None:
        """One query: p(Yes) by position in its list, and each position's candidate id (position 0 the positive)."""
        self.positives.append(probabilities[0])
        self.negatives += [p for position, p in probabilities.items() if candidate_ids[position] != candidate_ids[0]]

    def auc(self) -> float | None:
        """The pooled ROC AUC (ties count half), or None without a positive or a negative."""
        if not self.positives or not self.negatives:
            return None
        return round(separation_auc(self.positives, self.negatives), 6)


#: Files of an output directory that are not per-subset results.
_RESERVED_STEMS = {"summary"}


def subset_file_name(name: str) -> str:
    """``<Subset>.json``; a name that needs changing to be a safe file name (``a/b``, ``a b``) or
    that would shadow the summary gets a hash of the real name appended, so two subsets never
    write the same file ("a/b" and "a_b" once overwrote each other's results)."""
    safe = re.sub(r"[^A-Za-z0-9._+-]", "_", name)
    if safe != name or safe.lower() in _RESERVED_STEMS or safe.startswith("."):
        safe = f"{safe}-{hashlib.sha1(name.encode('utf-8')).hexdigest()[:8]}"
    return safe + ".json"


def check_output_directory(out: Path, fingerprint: str, overwrite: bool = False,
                           owns: Callable[[str], bool] | None = None) -> None:
    """Refuse an ``--out`` that holds per-subset results of ANOTHER model: they would sit beside
    the new summary as if they belonged to it. ``overwrite`` removes them instead -- only those
    that ``owns`` (the output directory's record, :class:`~rematch.outputs.OutputDirectory`)
    says rematch wrote: a file of the user's is never deleted."""
    if not out.is_dir():
        return
    stale = []
    for path in sorted(out.glob("*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and "subset" in record and record.get("model_fingerprint") not in (None,
                                                                                                      fingerprint):
            stale.append(path)
    foreign = [path for path in stale if owns is not None and not owns(path.name)]
    if foreign:
        raise FileExistsError(f"{out} holds result files of another model that rematch did not record writing "
                              f"({', '.join(p.name for p in foreign[:3])}); refusing to replace them, --overwrite "
                              "or not: move them away, or choose a new --out")
    if stale and not overwrite:
        raise FileExistsError(f"{out} holds results of another model ({', '.join(p.name for p in stale[:3])}"
                              f"{', ...' if len(stale) > 3 else ''}); choose a new --out, or pass --overwrite "
                              "(overwrite=True) to remove them")
    for path in stale:
        path.unlink()


def evaluate_mmeb(model, examples_by_subset: Mapping[str, Iterable[EvalExample]], out_dir: str | os.PathLike | None,
                  *, batch_size: int = 16, cache_dir: str | os.PathLike | None = None, ks: Sequence[int] = (1, 5),
                  plot: bool = True, rerank: int = 0, show_progress: bool = False,
                  skipped_rows: Mapping[str, object] | None = None, limits: InputLimits | None = None,
                  overwrite: bool = False, subset_infos: Mapping[str, SubsetInfo] | None = None,
                  target_prompt_style: str | None = None, log: Callable[[str], None] | None = print) -> dict:
    """Run the MMEB protocol on every subset and write ``<out>/<Subset>.json`` + the summary files.

    ``model`` needs ``encode``, ``fingerprint`` and ``config`` (a :class:`~rematch.ReMatchModel`).
    ``examples_by_subset`` maps a subset name to its examples (any iterable, read once).
    ``cache_dir=None`` disables the embedding cache. ``skipped_rows`` maps a subset to the
    reader's bad-row report (anything with ``.total``), recorded as ``skipped_rows``.
    ``subset_infos`` gives meta-task and split of subsets outside MMEB's table (a data
    root's manifest: :func:`~rematch.data.mmeb_subsets.read_manifest_subsets`).
    ``limits`` (e.g. :data:`~rematch.evaluation.settings.OFFICIAL_MMEB_V1_QWEN2VL`) are the
    image/text input limits to encode with, applied for this call only; None keeps the
    model's own (``rematch eval mmeb`` defaults to the official ones). ``target_prompt_style``
    ("b3" or "system", :mod:`rematch.instructions`) encodes the candidates in that style for
    this call (None: the model's own, the style it was trained with); the style in force is
    recorded in every result. Results of another model in ``out_dir`` are an error unless
    ``overwrite`` (then they are removed). Under ``torch.distributed`` every rank must call
    this with the same arguments; each encodes a shard, rank 0 writes the files, and every
    rank returns the same summary.
    """
    check_rerank(rerank)
    if not examples_by_subset:
        raise ValueError("no subsets to evaluate")
    with with_target_prompt_style(model, target_prompt_style):
        outputs = None
        if out_dir is not None and is_main_process():
            names = [subset_file_name(name) for name in examples_by_subset] + list(SUMMARY_FILES[:3 if plot else 2])
            outputs = claim_result_directory(Path(out_dir), "eval mmeb", model.fingerprint(), names, overwrite)
        with input_limits(model, limits) if limits is not None else contextlib.nullcontext():
            summary = _evaluate_mmeb(model, examples_by_subset, out_dir, batch_size=batch_size, cache_dir=cache_dir,
                                     ks=ks, plot=plot, rerank=rerank, show_progress=show_progress,
                                     skipped_rows=skipped_rows, log=log,
                                     preset=limits.preset if limits is not None else None, subset_infos=subset_infos)
        if outputs is not None:
            outputs.seal()
        return summary


#: The summary files an evaluation writes beside its per-subset results.
SUMMARY_FILES = ("summary.json", "summary.md", "summary.png")


def claim_result_directory(out: Path, command: str, fingerprint: str, names: Sequence[str], overwrite: bool):
    """Claim ``out`` for ``command``'s results (:class:`~rematch.outputs.OutputDirectory`: new,
    empty, or its own output; results of another model there only with ``overwrite``), before
    any encoding; the claim is sealed once the files are written."""
    from rematch.outputs import OutputDirectory, json_records_with

    adopt = json_records_with("model_fingerprint", also=SUMMARY_FILES[1:])
    OutputDirectory.inspect(out, command, adopt=adopt).check(*names)  # refusals first, nothing written yet
    outputs = OutputDirectory.claim(out, command, adopt=adopt)
    check_output_directory(out, fingerprint, overwrite, owns=outputs.owns)
    outputs.will_write(*names)
    return outputs


def _evaluate_mmeb(model, examples_by_subset: Mapping[str, Iterable[EvalExample]], out_dir, *, batch_size: int,
                   cache_dir, ks: Sequence[int], plot: bool, rerank: int, show_progress: bool,
                   skipped_rows: Mapping[str, object] | None, log: Callable[[str], None] | None,
                   preset: str | None = None, subset_infos: Mapping[str, SubsetInfo] | None = None) -> dict:
    """:func:`evaluate_mmeb` with the input limits already in place."""
    from rematch.evaluation.report import settings_line, summarize, write_summary

    ks = tuple(sorted(set(ks) | {1}))  # hit@1 is MMEB's score
    main = is_main_process()
    say = log if (log and main) else (lambda _: None)
    effective = current_limits(model)
    limits_record = None
    if effective is not None:
        limits_record = dataclasses.replace(effective, preset=preset or limits_preset(model, effective)).as_dict()
    encoder = CachedEncoder(model, cache_dir, batch_size=batch_size, show_progress=show_progress and main)
    out = Path(out_dir) if out_dir is not None else None
    results: dict[str, dict] = {}
    config = model_config_of(model)
    style = getattr(config, "target_prompt_style", None) if config.document_instructions else None
    say(settings_line(limits_record, rerank, style))
    try:
        for name, examples in examples_by_subset.items():
            result = evaluate_subset(encoder, name, examples, ks=ks, rerank=rerank,
                                     info=subset_info(name, subset_infos))
            result["model_fingerprint"] = encoder.fingerprint
            result["input_limits"] = limits_record
            result["target_prompt_style"] = style
            if skipped_rows is not None and name in skipped_rows:
                result["skipped_rows"] = int(skipped_rows[name].total)
            results[name] = result
            if out is not None and main:
                write_json_atomically(out / subset_file_name(name), result)
            separation = (f"  rerank AUC {result['rerank_auc']:.3f}" if result.get("rerank_auc") is not None
                          else "")
            say(f"{name:<22} hit@1 {100 * result['hit@1']:6.2f}  strict {100 * result['hit@1_strict']:6.2f}  "
                f"mrr {result['mrr']:.4f}{separation}  ({result['count']} queries, {result['unique_queries']} + "
                f"{result['unique_candidates']} unique items, {result['seconds']:.1f}s)")
    finally:
        encoder.close()
    stats: EncodeStats = gather_stats(encoder.stats)
    summary = summarize(results, fingerprint=encoder.fingerprint, throughput=stats.as_dict(),
                        primary="hit@1", input_limits=limits_record, tie_rule=TIE_RULE)
    summary["target_prompt_style"] = style
    if out is not None and main:
        write_summary(summary, out, plot=plot)
    say(f"encoded {stats.encoded} items in {stats.seconds:.1f}s ({stats.items_per_second:.1f} items/s), "
        f"{stats.cached} served from the embedding cache")
    if out is not None:
        say(f"wrote {out / 'summary.json'}, {out / 'summary.md'}" + (f", {out / 'summary.png'}" if plot else ""))
    return summary


def evaluate_mmeb_source(model, source: str, out_dir: str | os.PathLike | None, *,
                         subsets: Sequence[str] | None = None, split: str = "test",
                         image_root: str | None = None, skip_bad: bool = False,
                         strip_orphan_placeholders: bool = False,
                         log: Callable[[str], None] | None = print, **options) -> dict:
    """:func:`evaluate_mmeb` on MMEB-eval data: a local ROOT (``ROOT/<Subset>/test.jsonl|parquet``),
    one file, or a Hugging Face id such as ``TIGER-Lab/MMEB-eval`` (images under ``image_root``).

    With ``skip_bad`` unusable rows are skipped, counted per subset (``skipped_rows``) and
    summarised at the end; without it the first bad row is an error naming file, row and field.
    ``strip_orphan_placeholders`` repairs (and counts) texts that carry an image placeholder
    without an image, a quirk of some published MMEB rows (WebQA).
    """
    from rematch.data.mmeb import is_local, iter_eval_examples, list_subsets
    from rematch.data.validation import BadRowReport

    names = list(subsets) if subsets else list_subsets(source, split)
    if not names:
        raise EvalDataError(f"{source}: no subsets with a '{split}' split")
    reports = {name: BadRowReport() for name in names}
    examples = {name: iter_eval_examples(source, name, image_root=image_root, skip_bad=skip_bad,
                                         report=reports[name], split=split,
                                         strip_orphan_placeholders=strip_orphan_placeholders) for name in names}
    summary = evaluate_mmeb(model, examples, out_dir, skipped_rows=reports, log=log,
                            subset_infos=read_manifest_subsets(source) if is_local(source) else None, **options)
    if log and is_main_process():
        for name, report in reports.items():
            if report:
                log(f"{name}: {report.summary()}")
    return summary
