"""Dynamic batching: concurrent requests share one model forward, on one worker thread.

Why: a forward over 16 items costs far less than 16 forwards of one (the weights are read
once, the matrix products are wider), so merging concurrent requests multiplies
throughput. The worker takes the oldest request, then waits at most ``max_wait_ms`` for
more of the same role until ``max_batch`` items are gathered, and runs them through
``ReMatchModel.encode`` in one call. Other model work (reranking, search with rerank) is
queued as plain calls and runs on the same thread, so the model is never used by two
threads at once.

A failed batch is retried request by request, so an item that breaks the forward fails
only the request that sent it. ``close()`` stops taking work and finishes everything
already queued (graceful shutdown).
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from rematch.data.items import Item

log = logging.getLogger("rematch.serving")


class ServerBusy(RuntimeError):
    """Too many items are already waiting for the model; the client should retry later."""


class BatcherClosed(RuntimeError):
    """The server is shutting down and takes no new model work."""


@dataclass(frozen=True)
class EmbedResult:
    vectors: np.ndarray
    """(n, H) float32, L2-normalised, in the request's item order."""
    tokens: int
    """Input tokens of the request's items (see :func:`rematch.serving.usage.count_tokens`)."""


@dataclass
class _EmbedJob:
    items: list[Item]
    role: str
    future: Future
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class _CallJob:
    function: Callable[[], Any]
    future: Future


_STOP = object()


class DynamicBatcher:
    """Runs embedding requests in shared batches (and other model calls) on one worker thread."""

    def __init__(self, model, max_batch: int = 32, max_wait_ms: float = 5.0, max_queued_items: int = 8192,
                 token_counter: Callable[[Sequence[Item]], int] | None = None, metrics=None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.max_queued_items = max_queued_items
        self.token_counter = token_counter
        self.metrics = metrics
        self._queue: queue.Queue = queue.Queue()
        self._deferred: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._queued_items = 0
        self._closed = False
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- life cycle

    def start(self) -> "DynamicBatcher":
        if self._thread is not None:
            raise RuntimeError("the batcher is already running")
        self._thread = threading.Thread(target=self._run, name="rematch-model-worker", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: float | None = None) -> None:
        """Take no new work, finish what is queued, and stop the worker thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("the model worker did not finish its queued work within %ss", timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._closed

    # ---------------------------------------------------------------- submitting work

    def embed(self, items: Sequence[Item], role: str) -> Future:
        """A future of :class:`EmbedResult` for ``items`` encoded as ``role`` (possibly batched with others)."""
        items = list(items)
        if not items:
            raise ValueError("no items to embed")
        with self._lock:
            self._check_open()
            if self._queued_items + len(items) > self.max_queued_items and self._queued_items:
                raise ServerBusy(f"{self._queued_items} items are already waiting for the model; retry shortly")
            self._queued_items += len(items)
        job = _EmbedJob(items, role, Future())
        self._queue.put(job)
        self._observe_queue()
        return job.future

    def call(self, function: Callable[[], Any]) -> Future:
        """A future of ``function()`` run on the model thread (for model work that is not an embedding)."""
        with self._lock:
            self._check_open()
        job = _CallJob(function, Future())
        self._queue.put(job)
        return job.future

    def _check_open(self) -> None:
        if self._closed or self._thread is None:
            raise BatcherClosed("the server is shutting down")

    # ---------------------------------------------------------------- the worker

    def _run(self) -> None:
        while True:
            job = self._deferred.popleft() if self._deferred else self._queue.get()
            if job is _STOP:
                if self._deferred:  # jobs pulled in behind the stop marker still get served
                    self._deferred.append(_STOP)
                    continue
                return
            if isinstance(job, _CallJob):
                self._run_call(job)
            else:
                self._run_batch(self._gather(job))

    def _gather(self, first: _EmbedJob) -> list[_EmbedJob]:
        """``first`` plus queued requests of its role, until ``max_batch`` items or ``max_wait`` passes."""
        jobs, count = [first], len(first.items)
        for job in list(self._deferred):  # older requests set aside while gathering an earlier batch
            if count >= self.max_batch:
                return jobs
            if isinstance(job, _EmbedJob) and job.role == first.role and count + len(job.items) <= self.max_batch:
                self._deferred.remove(job)
                jobs.append(job)
                count += len(job.items)
        deadline = time.monotonic() + self.max_wait
        while count < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(job, _EmbedJob) and job.role == first.role and count + len(job.items) <= self.max_batch:
                jobs.append(job)
                count += len(job.items)
            else:
                self._deferred.append(job)
                if job is _STOP:
                    break
        return jobs

    def _run_batch(self, jobs: list[_EmbedJob]) -> None:
        live = [job for job in jobs if job.future.set_running_or_notify_cancel()]
        with self._lock:
            self._queued_items -= sum(len(job.items) for job in jobs)
        self._observe_queue()
        if not live:
            return
        started = time.perf_counter()
        items = [item for job in live for item in job.items]
        try:
            vectors = self.model.encode(items, role=live[0].role, batch_size=self.max_batch,
                                        where="input" if len(live) == 1 else "batched input")
        except Exception as error:  # noqa: BLE001 - isolated below, or handed to the one request
            if len(live) == 1:
                live[0].future.set_exception(error)
                return
            log.info("a batch of %d requests failed (%s); retrying them one by one", len(live), error)
            for job in live:
                self._encode_alone(job)
            return
        self._record(len(items), len(live), time.perf_counter() - started, live)
        start = 0
        for job in live:
            self._resolve(job, vectors[start:start + len(job.items)], job.future)
            start += len(job.items)

    def _encode_alone(self, job: _EmbedJob) -> None:
        started = time.perf_counter()
        try:
            vectors = self.model.encode(job.items, role=job.role, batch_size=self.max_batch, where="input")
        except Exception as error:  # noqa: BLE001 - this request's own failure
            job.future.set_exception(error)
            return
        self._record(len(job.items), 1, time.perf_counter() - started, [job])
        self._resolve(job, vectors, job.future)

    def _resolve(self, job: _EmbedJob, vectors: np.ndarray, future: Future) -> None:
        try:
            tokens = self.token_counter(job.items) if self.token_counter else 0
        except Exception as error:  # noqa: BLE001 - counting must not lose a computed embedding silently
            future.set_exception(error)
            return
        future.set_result(EmbedResult(vectors=vectors, tokens=tokens))

    def _run_call(self, job: _CallJob) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        try:
            job.future.set_result(job.function())
        except Exception as error:  # noqa: BLE001 - handed to the caller
            job.future.set_exception(error)

    # ---------------------------------------------------------------- metrics

    def _record(self, items: int, requests: int, seconds: float, jobs: list[_EmbedJob]) -> None:
        if self.metrics is None:
            return
        now = time.perf_counter()
        for size in range(0, items, self.max_batch):  # encode splits what exceeds max_batch
            self.metrics.batch_size.observe(min(self.max_batch, items - size))
        self.metrics.batch_requests.observe(requests)
        self.metrics.forward_seconds.observe(seconds)
        for job in jobs:
            self.metrics.queue_wait_seconds.observe(max(0.0, now - seconds - job.enqueued))

    def _observe_queue(self) -> None:
        if self.metrics is not None:
            self.metrics.queued_items.set(self._queued_items)
