"""vLLM's ``POST /score`` (and ``/v1/score``): a relevance score for (query, document) pairs.

Why: vLLM's score API is how clients written for it ask an embedding model "how related are
these two?" without handling vectors. For an embedding model vLLM answers with the cosine
of the two embeddings; here the first text is embedded as a query and the second as a
document (each with its own learnable tokens, as retrieval compares them), so a score
equals ``encode(q, role="query") @ encode(d, role="document")``. The matching head's
p(Yes) is ``/rerank``'s and ``/v1/rerank``'s answer.

Pairs as vLLM forms them: one ``text_1`` with a list ``text_2`` scores it against each;
two lists of the same length are scored pairwise.
"""

from __future__ import annotations

import time
import uuid

import numpy as np
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from rematch.serving.errors import BadValue
from rematch.serving.inputs import parse_items
from rematch.serving.schemas import ScoreRequest
from rematch.serving.service import Service


def add_score_routes(app: FastAPI, service: Service) -> None:
    """``/score`` and ``/v1/score`` on ``app``."""
    settings = service.settings

    async def score(request: ScoreRequest) -> JSONResponse:
        service.check_model(request.model)
        queries = await service.parse(parse_items, request.text_1, "text_1", service.policy, settings.max_inputs)
        documents = await service.parse(parse_items, request.text_2, "text_2", service.policy, settings.max_inputs)
        if len(queries) != 1 and len(queries) != len(documents):
            raise BadValue("text_1", f"has {len(queries)} entries and text_2 has {len(documents)}: give one text_1 "
                                     "(scored against every text_2) or as many as text_2 (scored pairwise)")
        embedded_queries = await service.embed(queries, "query", "text_1")
        embedded_documents = await service.embed(documents, "document", "text_2")
        query_vectors = np.broadcast_to(embedded_queries.vectors, embedded_documents.vectors.shape)
        scores = (query_vectors.astype(np.float64) * embedded_documents.vectors.astype(np.float64)).sum(axis=1)
        tokens = embedded_queries.tokens + embedded_documents.tokens
        data = [{"index": position, "object": "score", "score": float(value)} for position, value in enumerate(scores)]
        return JSONResponse({"id": f"score-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                             "model": settings.served_model_name, "data": data,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    app.post("/score")(score)
    app.post("/v1/score")(score)
