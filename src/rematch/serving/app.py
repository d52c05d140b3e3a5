"""The HTTP API of ``rematch serve``: embeddings, rerank, search, the search page, health and metrics.

Each route is thin: check the request (:mod:`.inputs`), hand model work to the one worker
thread (:mod:`.batcher`), shape the answer like the API clients already speak (OpenAI
embeddings, Cohere/Jina rerank). Request parsing and image decoding run in the thread
pool, so the event loop only moves bytes.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import threading
import uuid
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

import numpy as np
from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from rematch.data.items import ItemError
from rematch.retrieval.rerank import matching_probabilities
from rematch.serving.batcher import BatcherClosed, DynamicBatcher, ServerBusy
from rematch.serving.errors import ApiError, BadValue, SchemaError, install_error_handlers
from rematch.serving.inputs import ImagePolicy, parse_item, parse_items
from rematch.serving.metrics import ServingMetrics
from rematch.serving.middleware import ApiKeyMiddleware, BodyLimitMiddleware, MetricsMiddleware
from rematch.serving.schemas import EmbeddingRequest, RerankRequest, SearchRequest
from rematch.serving.settings import ServeSettings
from rematch.serving.thumbnails import ThumbnailError, Thumbnails
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
    service = _Service(model, index, settings, batcher)

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
    # Added last = outermost: metrics see every answer, the key is checked before any body is read.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


class _Service:
    """What the routes do, apart from HTTP."""

    def __init__(self, model, index, settings: ServeSettings, batcher: DynamicBatcher):
        self.model, self.index, self.settings, self.batcher = model, index, settings, batcher
        self.policy = ImagePolicy(files_root=settings.files_root, max_pixels=settings.max_image_pixels,
                                  max_file_bytes=settings.max_file_bytes, model_min_pixels=model.config.min_pixels,
                                  model_max_pixels=model.config.max_pixels,
                                  model_image_factor=model.adapter.image_factor)
        self.thumbnails = Thumbnails(index) if index is not None else None
        self.positions = {item_id: position for position, item_id in enumerate(index.ids)} if index else {}
        self.search_lock = threading.Lock()  # FAISS search parameters are set per call

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.settings.served_model_name:
            raise ApiError(404, f"model {name!r} is not served here; this server serves "
                                f"{self.settings.served_model_name!r}", param="model", code="model_not_found")

    async def run(self, future, param: str) -> Any:
        """Await model work; what it raises about the input becomes a 400 naming ``param``."""
        try:
            return await asyncio.wrap_future(future)
        except ItemError as error:
            raise BadValue(param, str(error)) from None

    def submit(self, submit, *args):
        try:
            return submit(*args)
        except ServerBusy as error:
            raise ApiError(503, str(error), code="server_busy") from None
        except BatcherClosed as error:
            raise ApiError(503, str(error), code="shutting_down") from None

    def search_vectors(self, vectors: np.ndarray, k: int):
        with self.search_lock:
            return self.index.search_vectors(vectors, k)

    def hit(self, hit, rerank_score: float | None) -> dict:
        position = self.positions[hit.id]
        fields = hit.metadata
        extra = {key: value for key, value in fields.items()
                 if key not in ("text", "image", "instruction", "image_in_memory")}
        answer = {"rank": hit.rank, "id": hit.id, "score": hit.score, "text": fields.get("text"),
                  "thumbnail_url": self.thumbnails.url(position), "metadata": extra}
        if rerank_score is not None:
            answer["rerank_score"] = rerank_score
        return answer


def _add_routes(app: FastAPI, service: _Service, metrics: ServingMetrics) -> None:
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
        items = await run_in_threadpool(parse_items, request.input, "input", service.policy, settings.max_inputs)
        result = await service.run(service.submit(service.batcher.embed, items, request.input_type), "input")
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

        def score():
            return matching_probabilities(model, query, documents), count_tokens(model, [query, *documents])

        scores, tokens = await service.run(service.submit(service.batcher.call, score), "documents")
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
        embedded = await service.run(service.submit(service.batcher.embed, [query], "query"), "query")
        (hits,) = await run_in_threadpool(service.search_vectors, embedded.vectors, max(request.k, top_n))
        rerank_scores: dict[str, float] = {}
        if top_n:
            head = hits[:top_n]
            documents = [service.index.item(service.positions[hit.id]) for hit in head]
            probabilities = await service.run(service.submit(
                service.batcher.call, lambda: matching_probabilities(model, query, documents)), "query")
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
