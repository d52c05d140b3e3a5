"""ASGI layers in front of the routes: metrics (outermost), API key, body size limit.

They are plain ASGI wrappers rather than route dependencies so that they act before a
body is read: a client without the key cannot make the server buffer 16 MB, and a body
over the limit is refused (413) while it streams in, whether or not it declared its
length. Order matters: metrics see every answer, including 401 and 413.
"""

from __future__ import annotations

import hmac
import json
import time

from rematch.serving.errors import error_body

#: Reachable without the API key: the page (it holds no data; it asks for the key), liveness and
#: the Prometheus metrics (counts, no data: a scraper has no token; ``--protect-metrics`` closes it).
PUBLIC_PATHS = ("/", "/health", "/favicon.ico", "/metrics")
PUBLIC_PREFIXES = ("/static/",)


def public_paths(protect_metrics: bool = False) -> tuple[str, ...]:
    """The paths open without the key: :data:`PUBLIC_PATHS`, less ``/metrics`` when it is protected."""
    return tuple(path for path in PUBLIC_PATHS if not (protect_metrics and path == "/metrics"))


async def send_json(send, status: int, body: dict, headers: list[tuple[bytes, bytes]] = ()) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": payload})


class MetricsMiddleware:
    """Counts every answered request by route and status, with its latency."""

    def __init__(self, app, metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500

        async def observed_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, observed_send)
        finally:
            self.metrics.in_flight.dec()
            self.metrics.observe_request(scope["path"], status, time.perf_counter() - started)


class ApiKeyMiddleware:
    """401 for requests without ``Authorization: Bearer <key>`` (constant-time comparison)."""

    def __init__(self, app, api_key: str, public: tuple[str, ...] = PUBLIC_PATHS):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()
        self.public = public

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self._public(scope["path"]):
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if not hmac.compare_digest(given, self.expected):
            message = ("missing API key: send the header 'Authorization: Bearer <key>'" if not given
                       else "invalid API key")
            return await send_json(send, 401, error_body(401, message, code="invalid_api_key"),
                                   [(b"www-authenticate", b"Bearer")])
        return await self.app(scope, receive, send)

    def _public(self, path: str) -> bool:
        return path in self.public or path.startswith(PUBLIC_PREFIXES)


class BodyLimitMiddleware:
    """413 for bodies over ``max_bytes``: by the declared length, or while reading an undeclared one.

    The body is read here (it is bounded) and replayed to the app, which reads whole bodies
    anyway; a body that outgrows the limit is refused without reading the rest.
    """

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                return await send_json(send, 400, error_body(400, "Content-Length is not a number"))
            if length > self.max_bytes:
                return await self._too_large(send, f" (it declares {length:,} bytes)")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self._too_large(send, "")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _too_large(self, send, detail: str) -> None:
        message = f"request body is larger than this server's limit of {self.max_bytes:,} bytes{detail}"
        await send_json(send, 413, error_body(413, message, code="request_too_large"), [(b"connection", b"close")])
