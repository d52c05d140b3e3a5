"""The HTTP API of ``rematch serve``: embeddings, rerank, search, the search page, health and metrics.

Each route is thin: check the request (:mod:`.inputs`), hand model work to the one worker
thread (:mod:`.batcher`, through :class:`.service.Service`), shape the answer like the API
clients already speak: OpenAI embeddings (and vLLM's chat-style ``messages``), Cohere/Jina
rerank here; TEI's ``/embed`` and ``/rerank`` in :mod:`.tei`; vLLM's ``/score`` in
:mod:`.score`. Request parsing and image decoding run in the thread pool, so the event
loop only moves bytes.
"""

from __future__ import annotations

import base64
import functools
import logging
import uuid
from contextlib import asynccontextmanager
from importlib import resources

import numpy as np
from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from rematch.serving.batcher import DynamicBatcher
from rematch.serving.errors import ApiError, BadValue, SchemaError, install_error_handlers
from rematch.serving.inputs import parse_item, parse_items
from rematch.serving.messages import parse_messages
from rematch.serving.metrics import ServingMetrics
from rematch.serving.middleware import ApiKeyMiddleware, BodyLimitMiddleware, MetricsMiddleware, public_paths
from rematch.serving.schemas import EmbeddingRequest, RerankRequest, SearchRequest
from rematch.serving.score import add_score_routes
from rematch.serving.service import Service
from rematch.serving.settings import ServeSettings
from rematch.serving.tei import add_tei_routes
from rematch.serving.thumbnails import ThumbnailError
from rematch.serving.usage import count_tokens

log = logging.getLogger("rematch.serving")

#: The search page's files (served from the package; nothing else under static/ is reachable).
STATIC_FILES = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}


def create_app(model, index=None, settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI app serving ``model`` (and ``index``, whose model it must be) under ``settings``.

    The model worker starts and stops with the app's lifespan: on shutdown, requests in
    flight and queued model work finish first.
    """
    settings = settings or ServeSettings()
    settings.validate()
    if index is not None and index.model is not model:
        index.attach(model)  # refuses a model the index was not built with
    metrics = ServingMetrics()
    batcher = DynamicBatcher(model, settings.max_batch, settings.max_wait_ms, settings.max_queued_items,
                             token_counter=functools.partial(count_tokens, model), metrics=metrics)
    service = Service(model, index, settings, batcher)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        try:
            yield
        finally:
            await run_in_threadpool(batcher.close, settings.shutdown_timeout_s)

    app = FastAPI(title="rematch", summary="ReMatch multimodal embeddings, reranking and search",
                  lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.batcher, app.state.metrics, app.state.settings = batcher, metrics, settings
    install_error_handlers(app)
    _add_routes(app, service, metrics)
    add_tei_routes(app, service)
    add_score_routes(app, service)
    # Added last = outermost: metrics see every answer, the key is checked before any body is read.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key,
                           public=public_paths(protect_metrics=settings.protect_metrics))
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


def _add_routes(app: FastAPI, service: Service, metrics: ServingMetrics) -> None:
    model, settings = service.model, service.settings
    page = resources.files("rematch.serving").joinpath("static")
    static = {name: page.joinpath(name).read_bytes() for name in STATIC_FILES}
    index_html = page.joinpath("index.html").read_text(encoding="utf-8")

    @app.get("/", include_in_schema=False)
    async def search_page() -> HTMLResponse:
        return HTMLResponse(index_html)

    @app.get("/static/{name}", include_in_schema=False)
    async def static_file(name: str) -> Response:
        if name not in static:
            raise ApiError(404, f"no static file {name!r}")
        return Response(static[name], media_type=STATIC_FILES[name])

    @app.get("/health")
    async def health() -> JSONResponse:
        running = service.batcher.running
        body = {"status": "ok" if running else "stopping", "model": settings.served_model_name,
                "dimension": model.hidden_size, "index": {"count": len(service.index)} if service.index else None,
                "auth_required": bool(settings.api_key)}
        return JSONResponse(body, status_code=200 if running else 503)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": settings.served_model_name, "object": "model",
                                                         "owned_by": "rematch"}]})

    @app.post("/v1/embeddings")
    async def embeddings(request: EmbeddingRequest) -> JSONResponse:
        service.check_model(request.model)
        if request.dimensions is not None and request.dimensions != model.hidden_size:
            raise BadValue("dimensions", f"this model's embeddings have {model.hidden_size} dimensions; "
                                         f"{request.dimensions} is not supported")
        if request.input is None and request.messages is None:
            raise SchemaError("input", "Field required (or vLLM's chat-style messages instead)")
        if request.input is not None and request.messages is not None:
            raise SchemaError("messages", "give either input (OpenAI) or messages (vLLM's chat-style input), not both")
        if request.messages is not None:
            param = "messages"
            items = [await run_in_threadpool(parse_messages, request.messages, param, service.policy)]
        else:
            param = "input"
            items = await run_in_threadpool(parse_items, request.input, param, service.policy, settings.max_inputs)
        result = await service.embed(items, request.input_type, param)
        data = [{"object": "embedding", "index": position, "embedding": _encode_vector(vector, request.encoding_format)}
                for position, vector in enumerate(result.vectors)]
        return JSONResponse({"object": "list", "data": data, "model": settings.served_model_name,
                             "usage": {"prompt_tokens": result.tokens, "total_tokens": result.tokens}})

    @app.post("/v1/rerank")
    async def rerank(request: RerankRequest) -> JSONResponse:
        service.check_model(request.model)
        if not isinstance(request.documents, list):
            raise SchemaError("documents", "expected a list of strings or {text, image, instruction} items")
        query = await run_in_threadpool(parse_item, request.query, "query", service.policy)
        documents = await run_in_threadpool(parse_items, request.documents, "documents", service.policy,
                                            settings.max_documents)
        scores, tokens = await service.match(query, documents, "documents")
        order = np.argsort(-scores, kind="stable")  # the order rematch.retrieval.rerank.rerank() gives
        results = []
        for position in order[:request.top_n] if request.top_n else order:
            result = {"index": int(position), "relevance_score": float(scores[position])}
            if request.return_documents:
                result["document"] = {"text": documents[position].text}
            results.append(result)
        return JSONResponse({"id": str(uuid.uuid4()), "model": settings.served_model_name, "results": results,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    @app.post("/v1/search")
    async def search(request: SearchRequest) -> JSONResponse:
        service.check_model(request.model)
        if service.index is None:
            raise ApiError(404, "no index is loaded on this server; start it with --index INDEX_DIR", code="no_index")
        if request.k > settings.max_k:
            raise BadValue("k", f"must be at most {settings.max_k}")
        top_n = request.k if request.rerank is True else int(request.rerank)
        if top_n > settings.max_k:
            raise BadValue("rerank", f"must be at most {settings.max_k}")
        query = await run_in_threadpool(parse_item, request.query, "query", service.policy)
        embedded = await service.embed([query], "query", "query")
        (hits,) = await run_in_threadpool(service.search_vectors, embedded.vectors, max(request.k, top_n))
        rerank_scores: dict[str, float] = {}
        if top_n:
            head = hits[:top_n]
            documents = [service.index.item(service.positions[hit.id]) for hit in head]
            probabilities, _ = await service.match(query, documents, "query")
            order = np.argsort(-probabilities, kind="stable")  # as Index.search(rerank=N) orders them
            rerank_scores = {head[i].id: float(probabilities[i]) for i in order}
            hits = [head[i] for i in order] + hits[top_n:]
        hits = [type(hit)(hit.id, hit.score, rank, hit.metadata) for rank, hit in enumerate(hits[:request.k], 1)]
        return JSONResponse({"object": "list", "model": settings.served_model_name, "rerank": top_n,
                             "data": [service.hit(hit, rerank_scores.get(hit.id)) for hit in hits]})

    @app.get("/v1/thumbnails/{position}")
    async def thumbnail(position: int) -> Response:
        if service.thumbnails is None:
            raise ApiError(404, "no index is loaded on this server", code="no_index")
        try:
            data = await run_in_threadpool(service.thumbnails.jpeg, position)
        except ThumbnailError as error:
            raise ApiError(404, str(error), param="position", code="no_thumbnail") from None
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})


def _encode_vector(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    """A float list, or OpenAI's base64 of little-endian float32 bytes."""
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector.astype(np.float32).tolist()
