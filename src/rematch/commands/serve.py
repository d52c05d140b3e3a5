"""``rematch serve``: the HTTP API and search page over a model (and an index), see docs/serving.md."""

from __future__ import annotations

import argparse
import sys

from rematch.commands.common import non_negative_int, positive_int
from rematch.commands.loading import add_model_loading_flags


def _settings(args: argparse.Namespace, served_model_name: str):
    from rematch.serving.settings import ServeSettings

    settings = ServeSettings(host=args.host, port=args.port, api_key=args.api_key, allow_files=args.allow_files,
                             max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                             max_body_bytes=args.max_body_bytes, max_image_pixels=args.max_image_pixels,
                             served_model_name=served_model_name)
    settings.validate()
    return settings


def _require_serving_packages() -> None:
    """The server's packages are an optional extra; say how to get them instead of an ImportError."""
    import importlib.util

    missing = [name for name in ("fastapi", "uvicorn", "prometheus_client") if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(f"rematch serve needs {', '.join(missing)}: pip install 'rematch[serve]'")


def cmd_serve(args: argparse.Namespace) -> int:
    _require_serving_packages()
    from rematch.commands.loading import load_model
    from rematch.retrieval.index import Index, index_model_spec
    from rematch.serving import create_app, serve

    if args.model is None and args.index is None:
        raise SystemExit("rematch serve: give --model (and optionally --index; with --index alone, the index's "
                         "recorded model is served)")
    spec = args.model if args.index is None else index_model_spec(args.index, args.model)
    settings = _settings(args, args.served_model_name or spec)  # flags checked before the model loads
    if not settings.is_loopback and not settings.api_key:
        print(f"rematch serve: warning: listening on {settings.host} without --api-key: anyone who can reach "
              "this address can use the server", file=sys.stderr)
    model = load_model(spec, args.device, allow_untrained=args.allow_untrained)
    index = Index.load(args.index, model=model) if args.index else None
    app = create_app(model, index, settings)
    where = f"http://{settings.host}:{settings.port}"
    print(f"rematch serve: model {spec}" + (f", index {args.index} ({len(index)} items)" if index else "")
          + f"; search page at {where}/ , API at {where}/v1/", flush=True)
    serve(app, settings, log_level=args.log_level)
    return 0


def register(sub) -> None:
    parser = sub.add_parser("serve", help="HTTP API (OpenAI-style embeddings, rerank, search) and a search page")
    parser.add_argument("--model", default=None,
                        help="model directory, hub id, or tiny[:size[:family]] (default with --index: the index's "
                             "recorded model)")
    parser.add_argument("--index", default=None, help="index directory for /v1/search and the search page")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 = everywhere)")
    parser.add_argument("--port", type=non_negative_int, default=8000)
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on every API route (the page and /health "
                             "stay open)")
    parser.add_argument("--allow-files", default=None, metavar="ROOT",
                        help="let requests name local image files under ROOT (default: data: URLs only)")
    parser.add_argument("--max-batch", type=positive_int, default=32,
                        help="most items one model forward takes; concurrent requests are merged up to this")
    parser.add_argument("--max-wait-ms", type=float, default=5.0,
                        help="how long the model waits for more requests to fill a batch (0-10000)")
    parser.add_argument("--max-body-bytes", type=positive_int, default=16 * 1024 * 1024,
                        help="larger request bodies get 413")
    parser.add_argument("--max-image-pixels", type=positive_int, default=25_000_000,
                        help="larger images (width x height) get 400")
    parser.add_argument("--served-model-name", default=None,
                        help="the model name /v1/models lists and requests may give (default: the --model spec)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_model_loading_flags(parser)
    parser.set_defaults(func=cmd_serve)
