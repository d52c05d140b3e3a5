"""Prometheus metrics of one server: requests, errors, latency, and how well batching works.

Each app gets its own registry (not prometheus_client's global one), so two servers in one
process (tests, the benchmark) never share or double-register counters.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

#: Route labels: the app's routes as templates, anything else as "other" (bounded label values).
KNOWN_ROUTES = ("/", "/health", "/metrics", "/v1/models", "/v1/embeddings", "/v1/rerank", "/v1/search", "/embed",
                "/rerank", "/score", "/v1/score")
THUMBNAIL_ROUTE = "/v1/thumbnails/{position}"


def route_label(path: str) -> str:
    if path in KNOWN_ROUTES:
        return path
    if path.startswith("/v1/thumbnails/"):
        return THUMBNAIL_ROUTE
    if path.startswith("/static/"):
        return "/static/{name}"
    return "other"


class ServingMetrics:
    """The counters and histograms ``GET /metrics`` exposes."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("rematch_requests", "HTTP requests answered", ["route", "status"], registry=r)
        self.errors = Counter("rematch_request_errors", "HTTP requests answered with status >= 400",
                              ["route", "status"], registry=r)
        self.latency = Histogram("rematch_request_latency_seconds", "Time from request to response",
                                 ["route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("rematch_requests_in_flight", "Requests being served now", registry=r)
        self.batch_size = Histogram("rematch_batch_size", "Items per model forward", buckets=_SIZE_BUCKETS,
                                    registry=r)
        self.batch_requests = Histogram("rematch_batch_requests", "Requests merged into one model forward",
                                        buckets=_SIZE_BUCKETS, registry=r)
        self.forward_seconds = Histogram("rematch_forward_seconds", "Time of one batched encode",
                                         buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_wait_seconds = Histogram("rematch_queue_wait_seconds", "Time a request waited for the model",
                                            buckets=_LATENCY_BUCKETS, registry=r)
        self.queued_items = Gauge("rematch_queued_items", "Items waiting for the model", registry=r)

    def observe_request(self, path: str, status: int, seconds: float) -> None:
        route = route_label(path)
        self.requests.labels(route, str(status)).inc()
        if status >= 400:
            self.errors.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
