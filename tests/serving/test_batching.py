"""Dynamic batching: concurrent requests share forwards, a bad request fails alone, shutdown finishes work."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from tests.support.serving import client, cosines, data_url, metric_value, running_server, shape_image, tiny_serving_model

from rematch.data.images import ImageLoadError
from rematch.data.items import Item
from rematch.serving.batcher import BatcherClosed, DynamicBatcher, ServerBusy

TEXTS = [f"a {colour} {shape}" for colour in ("red", "blue", "green", "yellow")
         for shape in ("circle", "star")]


@pytest.fixture(scope="module")
def model():
    return tiny_serving_model()


def _embed_concurrently(server, inputs, workers=8) -> list[httpx.Response]:
    with client(server) as http, ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda value: http.post("/v1/embeddings", json={"input": value}), inputs))


def test_concurrent_requests_share_one_forward_and_get_their_own_rows(model):
    with running_server(model, api_key="test-key-123", max_batch=8, max_wait_ms=300) as server:
        answers = _embed_concurrently(server, TEXTS)
        with client(server) as http:
            metrics = http.get("/metrics").text
    assert all(answer.status_code == 200 for answer in answers)
    served = np.array([answer.json()["data"][0]["embedding"] for answer in answers])
    assert cosines(served, model.encode(TEXTS)).min() >= 0.9999  # each request got its own row back
    forwards = metric_value(metrics, "rematch_batch_requests_count")
    assert metric_value(metrics, "rematch_batch_requests_sum") == len(TEXTS)
    assert forwards < len(TEXTS), "8 concurrent requests were never merged into one forward"
    assert metric_value(metrics, "rematch_batch_size_bucket", 'le="1.0"') < forwards  # some batch had > 1 item
    assert metric_value(metrics, "rematch_batch_size_bucket", 'le="8.0"') == forwards  # never over --max-batch


def test_max_batch_one_serves_requests_one_at_a_time(model):
    with running_server(model, api_key="test-key-123", max_batch=1, max_wait_ms=50) as server:
        answers = _embed_concurrently(server, TEXTS[:4], workers=4)
        with client(server) as http:
            metrics = http.get("/metrics").text
    assert all(answer.status_code == 200 for answer in answers)
    assert metric_value(metrics, "rematch_batch_size_count") == 4
    assert metric_value(metrics, "rematch_batch_size_bucket", 'le="1.0"') == 4


def test_a_bad_request_among_concurrent_ones_fails_alone(model):
    garbage = data_url(b"GIF89a broken")
    inputs = [TEXTS[0], [TEXTS[1], {"image": garbage}], TEXTS[2], [{"image": data_url(b"")}], TEXTS[3]]
    with running_server(model, api_key="test-key-123", max_batch=8, max_wait_ms=200) as server:
        answers = _embed_concurrently(server, inputs, workers=5)
    assert [answer.status_code for answer in answers] == [200, 400, 200, 400, 200]
    assert answers[1].json()["error"]["param"] == "input[1].image"
    assert answers[3].json()["error"]["param"] == "input[0].image"


def test_an_item_that_breaks_the_forward_fails_only_its_request(model):
    """The batcher's own isolation: an item that passes validation but fails inside ``encode`` (here an
    image of aspect ratio 300 handed to it directly) is retried alone; its batch-mates still get rows."""
    batcher = DynamicBatcher(model, max_batch=8, max_wait_ms=300).start()
    try:
        good = batcher.embed([Item(text=TEXTS[0]), Item(image=shape_image("red", "circle"))], "document")
        bad = batcher.embed([Item(text="fine"), Item(image=shape_image("red", "circle").resize((600, 2)))],
                            "document")
        also_good = batcher.embed([Item(text=TEXTS[1])], "document")
        with pytest.raises(ImageLoadError, match="input 1"):
            bad.result(timeout=120)
        expected = model.encode([TEXTS[0], {"image": shape_image("red", "circle")}, TEXTS[1]], role="document")
        served = np.concatenate([good.result(timeout=120).vectors, also_good.result(timeout=120).vectors])
        assert cosines(served, expected).min() >= 0.9999
    finally:
        batcher.close()


def test_a_full_queue_answers_busy_and_a_closed_batcher_takes_no_work(model):
    release = threading.Event()
    batcher = DynamicBatcher(model, max_batch=4, max_wait_ms=0, max_queued_items=3).start()
    try:
        blocker = batcher.call(lambda: release.wait(60))  # keeps the worker busy while the queue fills
        first = batcher.embed([Item(text="a"), Item(text="b")], "query")
        with pytest.raises(ServerBusy):
            batcher.embed([Item(text="c"), Item(text="d")], "query")
        release.set()
        assert blocker.result(timeout=60) is True and first.result(timeout=120).vectors.shape == (2, 128)
    finally:
        release.set()
        batcher.close()
    with pytest.raises(BatcherClosed):
        batcher.embed([Item(text="late")], "query")


def test_shutdown_finishes_in_flight_requests(model):
    """A request waiting for its batch when shutdown begins still gets its embeddings; then the port closes."""
    with running_server(model, max_batch=8, max_wait_ms=1500) as server:
        results = {}

        def request():
            with client(server, key=None) as http:
                results["answer"] = http.post("/v1/embeddings", json={"input": TEXTS[:3]})

        caller = threading.Thread(target=request)
        caller.start()
        with client(server, key=None) as http:
            deadline = time.monotonic() + 30
            while metric_value(http.get("/metrics").text, "rematch_queued_items") < 3:  # it is queued
                assert time.monotonic() < deadline, "the request never reached the model queue"
                time.sleep(0.02)
        server.request_stop()
        caller.join(timeout=60)
        url = server.url
    answer = results["answer"]
    assert answer.status_code == 200 and len(answer.json()["data"]) == 3
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health", timeout=5)
