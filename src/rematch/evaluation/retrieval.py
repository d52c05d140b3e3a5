"""Corpus retrieval evaluation: rank the WHOLE corpus for every query (exact, no index).

Unlike MMEB, where each query has its own short candidate list, here every query is
scored against every document, with relevance from a qrels file. Metrics:
recall@k, nDCG@10 (linear gains), MRR over the full ranking, and hit@1. Ties follow the
pessimistic rule of :mod:`rematch.evaluation.metrics`.

Queries with no positive judgement cannot be scored; they are left out of the means and
counted in ``queries_without_relevant`` (and the command prints the count).

Qrels formats (chosen by file suffix):

* ``.tsv`` — BEIR: ``query-id<TAB>corpus-id<TAB>score``, optional header line;
* ``.txt`` / ``.trec`` — TREC: ``query-id 0 doc-id relevance``;
* ``.jsonl`` — ``{"query_id": ..., "doc_id": ..., "relevance": 1}`` (relevance optional, default 1).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from rematch.data.items import Item
from rematch.encoding.cache import CachedEncoder
from rematch.distributed import is_main_process
from rematch.encoding.distributed import encode_across_ranks, gather_stats
from rematch.evaluation.metrics import RelevantRanks, check_finite, mean_metrics, per_query_metrics, ranks_of_relevant
from rematch.atomic import write_json_atomically
from rematch.retrieval.corpus import CorpusError, json_object
from rematch.retrieval.rerank import check_rerank, reranked_scores

_SCORE_BLOCK = 1 << 22
_HEADER_NAMES = {"query-id", "query_id", "qid", "query"}

Qrels = Mapping[str, Mapping[str, float]]


def read_qrels(path: str | os.PathLike, query_ids: Sequence[str] | None = None,
               corpus_ids: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """``{query_id: {doc_id: grade}}``; ids not among ``query_ids``/``corpus_ids`` are an error naming the line."""
    path = Path(path)
    known_queries = set(query_ids) if query_ids is not None else None
    known_docs = set(corpus_ids) if corpus_ids is not None else None
    qrels: dict[str, dict[str, float]] = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            parsed = _parse_qrel(path.suffix.lower(), line, where, first_line=number == 1)
            if parsed is None:  # the header line
                continue
            query_id, doc_id, grade = parsed
            if known_queries is not None and query_id not in known_queries:
                raise CorpusError(f"{where}: query id {query_id!r} is not in the queries file")
            if known_docs is not None and doc_id not in known_docs:
                raise CorpusError(f"{where}: document id {doc_id!r} is not in the corpus")
            if doc_id in qrels.get(query_id, {}):
                raise CorpusError(f"{where}: ({query_id!r}, {doc_id!r}) is judged twice")
            qrels.setdefault(query_id, {})[doc_id] = grade
    if not qrels:
        raise CorpusError(f"{path}: no relevance judgements")
    return qrels


def _parse_qrel(suffix: str, line: str, where: str, first_line: bool) -> tuple[str, str, float] | None:
    if suffix == ".jsonl":
        row = json_object(line, where)
        doc_key = "doc_id" if "doc_id" in row else "corpus_id"
        for key in ("query_id", doc_key):
            if key not in row:
                raise CorpusError(f"{where}: field '{key}' is missing")
        fields = [row["query_id"], row[doc_key], row.get("relevance", row.get("score", 1))]
    elif suffix == ".tsv":
        fields = line.rstrip("\n").split("\t")
        if len(fields) != 3:
            raise CorpusError(f"{where}: expected 3 tab-separated fields (query-id, corpus-id, score)")
    else:
        fields = line.split()
        if len(fields) != 4:
            raise CorpusError(f"{where}: expected 4 fields (query-id, 0, doc-id, relevance) in TREC format")
        fields = [fields[0], fields[2], fields[3]]
    try:
        grade = float(fields[2])
    except (TypeError, ValueError):
        if first_line and suffix == ".tsv" and str(fields[0]).lower() in _HEADER_NAMES:
            return None
        raise CorpusError(f"{where}: relevance {fields[2]!r} is not a number") from None
    if not np.isfinite(grade):
        raise CorpusError(f"{where}: relevance {fields[2]!r} is not finite")
    return str(fields[0]), str(fields[1]), grade


#: What ``evaluate_retrieval`` writes into its output directory.
RESULT_FILE = "retrieval.json"


def evaluate_retrieval(model, query_ids: Sequence[str], queries: Sequence[Item], corpus_ids: Sequence[str],
                       corpus: Sequence[Item], qrels: Qrels, *, ks: Sequence[int] = (1, 5, 10, 100),
                       ndcg_k: int = 10, batch_size: int = 16, cache_dir: str | os.PathLike | None = None,
                       rerank: int = 0, out_dir: str | os.PathLike | None = None, show_progress: bool = False,
                       log: Callable[[str], None] | None = print) -> dict:
    """Embed queries and corpus (cached, sharded across ranks), rank the whole corpus, return metrics.

    Writes ``<out_dir>/retrieval.json`` when ``out_dir`` is given (rank 0 only).
    """
    check_rerank(rerank)
    main = is_main_process()
    say = log if (log and main) else (lambda _: None)
    position = {doc_id: i for i, doc_id in enumerate(corpus_ids)}
    judged = [i for i, qid in enumerate(query_ids) if any(g > 0 for g in qrels.get(qid, {}).values())]
    if not judged:
        raise ValueError("no query has a relevant document in the qrels")
    unknown = sorted({doc for judgements in qrels.values() for doc in judgements} - set(position))
    if unknown:
        raise ValueError(f"qrels name {len(unknown)} document(s) not in the corpus, e.g. {unknown[:3]}")
    unknown = sorted(set(qrels) - set(query_ids))
    if unknown:
        raise ValueError(f"qrels name {len(unknown)} query id(s) not among the queries, e.g. {unknown[:3]}")
    if len(query_ids) != len(queries) or len(corpus_ids) != len(corpus):
        raise ValueError("query_ids/queries and corpus_ids/corpus must have the same lengths")

    outputs = None
    if out_dir is not None and main:  # new, empty or an earlier `eval retrieval` output: refused before encoding
        from rematch.outputs import claim_outputs, json_records_with

        outputs = claim_outputs(out_dir, "eval retrieval", [RESULT_FILE], adopt=json_records_with("model_fingerprint"))
    encoder = CachedEncoder(model, cache_dir, batch_size=batch_size, show_progress=show_progress and main)
    start = time.perf_counter()
    try:
        query_vectors = encode_across_ranks(encoder, [queries[i] for i in judged], "query")
        corpus_vectors = encode_across_ranks(encoder, list(corpus), "document")
    finally:
        encoder.close()

    width = max(sum(g > 0 for g in qrels[query_ids[i]].values()) for i in judged)
    relevant_index = np.full((len(judged), width), -1, dtype=np.int64)
    relevant_grade = np.zeros((len(judged), width))
    for row, i in enumerate(judged):
        positives = [(position[doc], g) for doc, g in sorted(qrels[query_ids[i]].items()) if g > 0]
        relevant_index[row, :len(positives)] = [p for p, _ in positives]
        relevant_grade[row, :len(positives)] = [g for _, g in positives]

    chunk = max(1, _SCORE_BLOCK // max(1, len(corpus)))
    all_ranks, all_grades = [], []
    for begin in range(0, len(judged), chunk):
        end = min(len(judged), begin + chunk)
        scores = (query_vectors[begin:end] @ corpus_vectors.T).astype(np.float64)
        check_finite(scores, "retrieval scores")
        if rerank:
            for row in range(end - begin):
                scores[row] = reranked_scores(model, queries[judged[begin + row]], corpus, scores[row], rerank,
                                              query_embedding=query_vectors[begin + row],
                                              candidate_embeddings=corpus_vectors)
        ranks = ranks_of_relevant(scores, relevant_index[begin:end], relevant_grade[begin:end])
        all_ranks.append(ranks.ranks)
        all_grades.append(ranks.grades)
    ranks = RelevantRanks(np.concatenate(all_ranks), np.concatenate(all_grades))
    metrics = mean_metrics(per_query_metrics(ranks, hit_ks=(1,), recall_ks=ks, ndcg_ks=(ndcg_k,)))
    stats = gather_stats(encoder.stats)
    result = {
        "metrics": {key: round(value, 6) for key, value in metrics.items()},
        "queries": len(judged),
        "queries_without_relevant": len(query_ids) - len(judged),
        "corpus_size": len(corpus),
        "model_fingerprint": encoder.fingerprint,
        "rerank": rerank,
        "throughput": stats.as_dict(),
        "seconds": round(time.perf_counter() - start, 3),
    }
    if outputs is not None:
        write_json_atomically(Path(out_dir) / RESULT_FILE, result)
        outputs.seal()
    if result["queries_without_relevant"]:
        say(f"note: {result['queries_without_relevant']} queries have no relevant document in the qrels "
            "and are not scored")
    say("  ".join(f"{name} {value:.4f}" for name, value in result["metrics"].items()))
    say(f"{len(judged)} queries x {len(corpus)} documents; encoded {stats.encoded} items in {stats.seconds:.1f}s "
        f"({stats.items_per_second:.1f} items/s), {stats.cached} from the embedding cache")
    return result
