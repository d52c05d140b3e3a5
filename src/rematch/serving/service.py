"""What the routes do, apart from HTTP: the model, the index, the settings and the model worker.

Why its own module: the routes of every API shape the server speaks (OpenAI, Cohere/Jina,
TEI, vLLM's ``/score``) share one model worker, one image policy and one way of turning
model errors into answers. Each family of routes lives in its own module and reaches
those through a :class:`Service`, so no route module imports another.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Sequence

import numpy as np
from starlette.concurrency import run_in_threadpool

from rematch.data.items import Item, ItemError
from rematch.retrieval.rerank import matching_probabilities
from rematch.serving.batcher import BatcherClosed, DynamicBatcher, EmbedResult, ServerBusy
from rematch.serving.errors import ApiError, BadValue
from rematch.serving.inputs import ImagePolicy
from rematch.serving.settings import ServeSettings
from rematch.serving.thumbnails import Thumbnails
from rematch.serving.usage import count_tokens


class Service:
    """The served model (and index) with the helpers every route uses."""

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
        """A request's ``model`` must be one of the names this server answers to (or absent)."""
        if name is not None and not self.settings.serves(name):
            names = ", ".join(repr(served) for served in self.settings.model_names)
            raise ApiError(404, f"model {name!r} is not served here; this server serves {names}", param="model",
                           code="model_not_found")

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

    async def embed(self, items: Sequence[Item], role: str, param: str) -> EmbedResult:
        """``items`` embedded as ``role`` on the model worker (batched with other requests)."""
        return await self.run(self.submit(self.batcher.embed, list(items), role), param)

    async def match(self, query: Item, documents: Sequence[Item], param: str) -> tuple[np.ndarray, int]:
        """p(Yes) of each document for ``query`` (the matching head) and the tokens read, on the model worker."""
        model = self.model

        def score():
            return matching_probabilities(model, query, list(documents)), count_tokens(model, [query, *documents])

        return await self.run(self.submit(self.batcher.call, score), param)

    async def parse(self, function, *args):
        """Request parsing and image decoding, off the event loop."""
        return await run_in_threadpool(function, *args)

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
