"""Prepare the next batches in a background thread while the model runs on the current one.

``encode`` (and so eval, index build, search and mine) spends much of its time on the CPU:
decoding and resizing images, the image processor, tokenising. Done in line, the
accelerator waits for it every batch. :class:`Prefetcher` runs the preparation of up to
``depth`` batches ahead in one worker thread (PIL, numpy and the Rust tokenizer release
the GIL for most of that work), hands results back in order, and re-raises a failed
preparation's own exception at that batch's turn, so an error still names its item.

It is a context manager: leaving the ``with`` block -- normally, on an error in the
consumer, or on an error from a preparation -- cancels what has not started, waits for
the one batch in flight and joins the thread. Nothing keeps running after ``encode``
returns or raises.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Generic, Iterable, Iterator, TypeVar

Task = TypeVar("Task")
Result = TypeVar("Result")


class Prefetcher(Generic[Task, Result]):
    """Iterate ``(task, prepare(task))`` in task order, preparing up to ``depth`` tasks ahead.

    ``depth=0`` prepares each task in the calling thread when it is reached (no thread at
    all): the same results, for comparisons and for callers that must stay single-threaded.
    """

    def __init__(self, prepare: Callable[[Task], Result], tasks: Iterable[Task], depth: int = 2,
                 thread_name: str = "rematch-prefetch"):
        if depth < 0:
            raise ValueError(f"prefetch depth must be >= 0, got {depth}")
        self.prepare = prepare
        self.tasks = iter(tasks)
        self.depth = depth
        self.thread_name = thread_name
        self.pool: ThreadPoolExecutor | None = None
        self.pending: deque[tuple[Task, Future]] = deque()

    def __enter__(self) -> Iterator[tuple[Task, Result]]:
        if self.depth:
            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self.thread_name)
        return self._results()

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Cancel what has not started, wait for the batch in flight, join the thread."""
        for _, future in self.pending:
            future.cancel()
        self.pending.clear()
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None

    def _fill(self) -> None:
        while len(self.pending) < self.depth:
            task = next(self.tasks, _DONE)
            if task is _DONE:
                return
            self.pending.append((task, self.pool.submit(self.prepare, task)))

    def _results(self) -> Iterator[tuple[Task, Result]]:
        if self.pool is None:
            for task in self.tasks:
                yield task, self.prepare(task)
            return
        self._fill()
        while self.pending:
            task, future = self.pending.popleft()
            result = future.result()  # a preparation's exception surfaces here, at its turn
            self._fill()  # the next batch starts before the consumer runs on this one
            yield task, result


_DONE = object()
