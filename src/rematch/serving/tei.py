"""text-embeddings-inference's routes: ``POST /embed`` and ``POST /rerank``.

Why: TEI is what many retrieval stacks (LangChain's and LlamaIndex's TEI classes,
huggingface_hub's ``InferenceClient``) call for embeddings and reranking, with its own
shapes: ``{"inputs": ...}`` answered by a bare list of vectors, and ``{"query", "texts"}``
answered by ``[{"index", "score"}]`` best first. These routes speak that shape over the
same model worker as the OpenAI routes, so the vectors are ``ReMatchModel.encode``'s and
the rerank scores are the matching head's p(Yes), exactly as ``/v1/rerank`` gives them.

Where ReMatch cannot do what a TEI flag asks (unnormalised vectors, raw logits), the
request is refused with a 400 naming the flag rather than answered with something else.
"""

from __future__ import annotations

import numpy as np
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from rematch.serving.errors import BadValue
from rematch.serving.inputs import parse_item, parse_items
from rematch.serving.schemas import TeiEmbedRequest, TeiRerankRequest
from rematch.serving.service import Service


def add_tei_routes(app: FastAPI, service: Service) -> None:
    """``/embed`` and ``/rerank`` on ``app``."""
    settings, model = service.settings, service.model

    @app.post("/embed")
    async def embed(request: TeiEmbedRequest) -> JSONResponse:
        if not request.normalize:
            raise BadValue("normalize", "this server's vectors are always L2-normalised (cosine = dot product); "
                                        "false is not supported")
        if request.dimensions is not None and request.dimensions != model.hidden_size:
            raise BadValue("dimensions", f"this model's embeddings have {model.hidden_size} dimensions; "
                                         f"{request.dimensions} is not supported")
        items = await service.parse(parse_items, request.inputs, "inputs", service.policy, settings.max_inputs)
        result = await service.embed(items, request.prompt_name or "query", "inputs")
        return JSONResponse([vector.astype(np.float32).tolist() for vector in result.vectors])

    @app.post("/rerank")
    async def rerank(request: TeiRerankRequest) -> JSONResponse:
        if request.raw_scores:
            raise BadValue("raw_scores", "scores are the matching head's p(Yes) in [0, 1]; raw scores are not "
                                         "supported")
        query = await service.parse(parse_item, request.query, "query", service.policy)
        texts = await service.parse(parse_items, request.texts, "texts", service.policy, settings.max_documents)
        scores, _ = await service.match(query, texts, "texts")
        answer = []
        for position in np.argsort(-scores, kind="stable"):  # the order rematch.retrieval.rerank.rerank() gives
            result = {"index": int(position), "score": float(scores[position])}
            if request.return_text:
                result["text"] = texts[position].text
            answer.append(result)
        return JSONResponse(answer)
