"""``rematch serve``: the HTTP API and search page over a model (and an index), see docs/serving.md."""

from __future__ import annotations

import argparse
import sys

from rematch.commands.common import non_negative_int, positive_int
from rematch.commands.loading import add_model_loading_flags


def _settings(args: argparse.Namespace, spec: str):
    from rematch.serving.names import served_names
    from rematch.serving.settings import ServeSettings

    name, aliases = served_names(spec, args.served_model_name)
    settings = ServeSettings(host=args.host, port=args.port, api_key=args.api_key, allow_files=args.allow_files,
                             max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                             max_body_bytes=args.max_body_bytes, max_image_pixels=args.max_image_pixels,
                             served_model_name=name, model_aliases=aliases, protect_metrics=args.protect_metrics)
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
    from rematch.serving import create_app, listening_socket, serve

    if args.model is None and args.index is None:
        raise SystemExit("rematch serve: give --model (and optionally --index; with --index alone, the index's "
                         "recorded model is served)")
    spec = args.model if args.index is None else index_model_spec(args.index, args.model)
    settings = _settings(args, spec)  # flags checked before the model loads
    if not settings.is_loopback and not settings.api_key:
        print(f"rematch serve: warning: listening on {settings.host} without --api-key: anyone who can reach "
              "this address can use the server", file=sys.stderr)
    sock = listening_socket(settings.host, settings.port)  # a busy port is refused before the model loads
    try:
        model = load_model(spec, args.device, allow_untrained=args.allow_untrained)
        index = Index.load(args.index, model=model) if args.index else None
        app = create_app(model, index, settings)
    except BaseException:
        sock.close()
        raise
    where = f"http://{settings.host}:{sock.getsockname()[1]}"  # the port chosen when --port 0
    names = " or ".join(repr(name) for name in settings.model_names)
    print(f"rematch serve: model {spec} as {names}" + (f", index {args.index} ({len(index)} items)" if index else "")
          + f"; search page at {where}/ , API at {where}/v1/", flush=True)
    serve(app, settings, log_level=args.log_level, sock=sock)
    return 0


def register(sub) -> None:
    parser = sub.add_parser("serve", help="HTTP API (OpenAI, TEI and vLLM shapes: embeddings, rerank, score, "
                                          "search) and a search page")
    parser.add_argument("--model", default=None,
                        help="model directory, hub id, or tiny[:size[:family]] (default with --index: the index's "
                             "recorded model)")
    parser.add_argument("--index", default=None, help="index directory for /v1/search and the search page "
                                                      "(default: none)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default %(default)s: this machine only; 0.0.0.0 = everywhere)")
    parser.add_argument("--port", type=non_negative_int, default=8000, help="port to listen on (default %(default)s)")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on every API route; the page, /health and "
                             "/metrics stay open (default: no key)")
    parser.add_argument("--protect-metrics", action="store_true",
                        help="with --api-key, /metrics needs the key too (default: open, as vLLM and TEI leave it "
                             "for Prometheus scrapers)")
    parser.add_argument("--allow-files", default=None, metavar="ROOT",
                        help="let requests name local image files under ROOT (default: data: URLs only)")
    parser.add_argument("--max-batch", type=positive_int, default=32,
                        help="most items one model forward takes; concurrent requests are merged up to this "
                             "(default %(default)s)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0,
                        help="how long the model waits for more requests to fill a batch, 0-10000 "
                             "(default %(default)s)")
    parser.add_argument("--max-body-bytes", type=positive_int, default=16 * 1024 * 1024,
                        help="larger request bodies get 413 (default %(default)s)")
    parser.add_argument("--max-image-pixels", type=positive_int, default=25_000_000,
                        help="larger images (width x height) get 400 (default %(default)s)")
    parser.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                        help="the model name /v1/models lists and answers carry; more names are accepted as "
                             "aliases (default: the hub id or the model directory's name, RUN for RUN/model; "
                             "'rematch' is always accepted)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                        help="uvicorn's log level (default %(default)s)")
    add_model_loading_flags(parser)
    parser.set_defaults(func=cmd_serve)
