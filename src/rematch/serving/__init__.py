"""``rematch serve``: an HTTP API (FastAPI + uvicorn) over a ReMatch model and, optionally, an index.

    from rematch.serving import ServeSettings, ServerThread, create_app
    app = create_app(model, index, ServeSettings(api_key="secret"))
    with ServerThread(app) as server: ...   # or rematch.serving.serve(app, settings)

Routes: ``POST /v1/embeddings`` (OpenAI; vLLM's chat-style ``messages`` too), ``POST
/v1/rerank`` (Cohere/Jina), ``POST /embed`` and ``POST /rerank`` (TEI), ``POST /score`` and
``/v1/score`` (vLLM), ``POST /v1/search``, ``GET /`` (search page), ``GET /health``, ``GET
/metrics`` (Prometheus). See docs/serving.md.
"""

from rematch.serving.app import create_app
from rematch.serving.server import ServerThread, listening_socket, serve
from rematch.serving.settings import ServeSettings

__all__ = ["ServeSettings", "ServerThread", "create_app", "listening_socket", "serve"]
