"""Evaluation: ranking metrics, the MMEB protocol with its reports, and corpus retrieval.

Main entry points::

    from rematch.evaluation import evaluate_mmeb, evaluate_retrieval, compute_metrics
"""

from rematch.encoding.cache import CachedEncoder, EmbeddingCache, EncodeStats, default_cache_dir, embedding_key
from rematch.evaluation.metrics import (
    RelevantRanks,
    compute_metrics,
    hit_at_k,
    ndcg_at_k,
    ranks_of_relevant,
    recall_at_k,
    reciprocal_rank,
    relevant_ranks,
)
from rematch.evaluation.mmeb import EvalDataError, evaluate_mmeb, evaluate_subset
from rematch.evaluation.report import aggregate, compare_summaries, load_summary, summarize, write_summary
from rematch.evaluation.retrieval import evaluate_retrieval, read_qrels
from rematch.evaluation.settings import (
    OFFICIAL_MMEB_V1_QWEN2VL,
    OFFICIAL_MMEB_V2_VIDEO_FRAMES,
    InputLimits,
    input_limits,
    resolve_limits,
    video_sampling,
    with_target_prompt_style,
)

__all__ = [
    "CachedEncoder", "EmbeddingCache", "EncodeStats", "EvalDataError", "InputLimits", "OFFICIAL_MMEB_V1_QWEN2VL",
    "OFFICIAL_MMEB_V2_VIDEO_FRAMES", "RelevantRanks", "aggregate", "input_limits", "resolve_limits",
    "video_sampling", "with_target_prompt_style",
    "compare_summaries", "compute_metrics", "default_cache_dir", "embedding_key", "evaluate_mmeb",
    "evaluate_retrieval", "evaluate_subset", "hit_at_k", "load_summary", "ndcg_at_k", "ranks_of_relevant",
    "read_qrels", "recall_at_k", "reciprocal_rank", "relevant_ranks", "summarize", "write_summary",
]
