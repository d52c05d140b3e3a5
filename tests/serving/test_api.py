"""``rematch serve`` over real HTTP: embeddings, rerank, search, thumbnails, health and metrics.

One server (tiny model, a 7-item index, an API key, an allowed file root) on an ephemeral
loopback port serves the whole module; results are compared with the library's own
``encode`` / ``rerank`` / ``Index.search`` on the same model.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image
from tests.support.serving import (
    API_KEY,
    build_index,
    client,
    cosines,
    data_url,
    metric_value,
    png_bytes,
    running_server,
    shape_image,
    tiny_serving_model,
)

from rematch.retrieval.rerank import matching_probabilities, rerank


@pytest.fixture(scope="module")
def model():
    return tiny_serving_model()


@pytest.fixture(scope="module")
def files_root(tmp_path_factory):
    return tmp_path_factory.mktemp("allowed")


@pytest.fixture(scope="module")
def index(model, files_root):
    return build_index(model, files_root)


@pytest.fixture(scope="module")
def server(model, index, files_root):
    with running_server(model, index, api_key=API_KEY, allow_files=files_root, max_batch=8, max_wait_ms=5,
                        max_body_bytes=400_000, max_image_pixels=200 * 200) as running:
        yield running


@pytest.fixture()
def http(server):
    with client(server) as session:
        yield session


def test_embeddings_equal_encode_for_text_images_and_both_roles(http, model, files_root):
    red, blue = shape_image("red", "circle"), shape_image("blue", "star", side=70)
    (files_root / "query.png").write_bytes(png_bytes(blue))
    inputs = ["a red circle",
              {"image": data_url(png_bytes(red))},
              {"text": "find this shape", "image": data_url(png_bytes(blue)), "instruction": "Retrieve the match"},
              {"image": "query.png"}]  # a path under --allow-files, relative to it
    expected_items = ["a red circle", {"image": red},
                      {"text": "find this shape", "image": blue, "instruction": "Retrieve the match"},
                      {"image": str(files_root / "query.png")}]
    for role in ("query", "document"):
        answer = http.post("/v1/embeddings", json={"input": inputs, "input_type": role}).json()
        assert answer["object"] == "list" and [row["index"] for row in answer["data"]] == [0, 1, 2, 3]
        served = np.array([row["embedding"] for row in answer["data"]])
        expected = model.encode(expected_items, role=role)
        assert served.shape == expected.shape
        assert cosines(served, expected).min() >= 0.9999, role
        assert answer["usage"]["prompt_tokens"] == answer["usage"]["total_tokens"] > 4 * model.num_tokens
    query, document = (np.array(http.post("/v1/embeddings", json={"input": "a red circle", "input_type": role})
                                .json()["data"][0]["embedding"]) for role in ("query", "document"))
    assert cosines(query, document) < 0.9999  # the two roles use different learnable tokens


def test_base64_encoding_is_little_endian_float32(http):
    plain = http.post("/v1/embeddings", json={"input": ["blue star"], "encoding_format": "float"}).json()
    packed = http.post("/v1/embeddings", json={"input": ["blue star"], "encoding_format": "base64"}).json()
    vector = np.frombuffer(base64.b64decode(packed["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(vector, plain["data"][0]["embedding"], rtol=0, atol=1e-6)


def test_rerank_order_and_scores_equal_the_library(http, model):
    red = shape_image("red", "circle")
    documents = ["a small blue star", {"image": data_url(png_bytes(red))}, "a large red circle",
                 {"text": "green", "image": data_url(png_bytes(shape_image("green", "square")))}]
    local = ["a small blue star", {"image": red}, "a large red circle",
             {"text": "green", "image": shape_image("green", "square")}]
    answer = http.post("/v1/rerank", json={"query": "a large red circle", "documents": documents,
                                           "return_documents": True}).json()
    assert [result["index"] for result in answer["results"]] == rerank(model, "a large red circle", local)
    scores = matching_probabilities(model, "a large red circle", local)
    np.testing.assert_allclose([result["relevance_score"] for result in answer["results"]],
                               np.sort(scores)[::-1], atol=1e-5)
    texts = [document if isinstance(document, str) else document.get("text") for document in local]
    assert all(result["document"]["text"] == texts[result["index"]] for result in answer["results"])
    top = http.post("/v1/rerank", json={"query": "a large red circle", "documents": documents, "top_n": 2}).json()
    assert [r["index"] for r in top["results"]] == [r["index"] for r in answer["results"][:2]]


def test_search_equals_index_search_with_and_without_rerank(http, index, files_root):
    for query, rerank_n in (("a red circle", 0), ("a red circle", 3), ("blue star", True)):
        answer = http.post("/v1/search", json={"query": query, "k": 4, "rerank": rerank_n}).json()
        expected = index.search(query, k=4, rerank=4 if rerank_n is True else rerank_n)[0]
        assert [hit["id"] for hit in answer["data"]] == [hit.id for hit in expected]
        np.testing.assert_allclose([hit["score"] for hit in answer["data"]], [hit.score for hit in expected],
                                   atol=1e-5)
        assert [hit["rank"] for hit in answer["data"]] == [1, 2, 3, 4]
        assert answer["rerank"] == (4 if rerank_n is True else rerank_n)
        assert all(("rerank_score" in hit) == (hit["rank"] <= answer["rerank"]) for hit in answer["data"])
        assert str(files_root) not in str(answer)  # no server path leaves the server
    image_query = {"image": data_url(png_bytes(shape_image("red", "circle")))}
    answer = http.post("/v1/search", json={"query": image_query, "k": 7}).json()
    assert [hit["id"] for hit in answer["data"]] == [hit.id for hit in index.search(
        [{"image": shape_image("red", "circle")}], k=7)[0]]
    by_id = {hit["id"]: hit for hit in answer["data"]}
    assert by_id["txt-a-large-red-circle"]["thumbnail_url"] is None
    assert by_id["txt-a-large-red-circle"]["text"] == "a large red circle"
    thumbnail = http.get(by_id["img-red-circle"]["thumbnail_url"])
    assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/jpeg"
    picture = Image.open(io.BytesIO(thumbnail.content))
    assert picture.format == "JPEG" and max(picture.size) <= 256
    assert np.asarray(picture.convert("RGB")).std() > 5  # the shape, not a blank square


def test_thumbnails_serve_indexed_images_only(http, index):
    text_position = index.ids.index("txt-a-large-red-circle")
    for path, status in ((f"/v1/thumbnails/{text_position}", 404), ("/v1/thumbnails/999", 404),
                         ("/v1/thumbnails/-1", 404), ("/v1/thumbnails/abc", 422),
                         ("/v1/thumbnails/..%2F..%2Fetc%2Fpasswd", 404),
                         ("/static/../serving/app.py", 404), ("/static/settings.py", 404)):
        answer = http.get(path)
        assert answer.status_code == status, path
        assert "error" in answer.json()


def test_health_models_page_and_metrics(server, http):
    with client(server, key=None) as anonymous:
        health = anonymous.get("/health").json()
        assert health == {"status": "ok", "model": "rematch", "dimension": 128, "index": {"count": 7},
                          "auth_required": True}
        page = anonymous.get("/")
        assert page.status_code == 200 and 'id="results"' in page.text
        assert anonymous.get("/static/app.js").headers["content-type"].startswith("text/javascript")
    assert http.get("/v1/models").json()["data"][0]["id"] == "rematch"
    http.post("/v1/embeddings", json={"input": "one more"})
    http.post("/v1/embeddings", json={"input": 5})
    text = http.get("/metrics").text
    assert metric_value(text, "rematch_requests_total", 'route="/v1/embeddings",status="200"') >= 1
    assert metric_value(text, "rematch_request_errors_total", 'route="/v1/embeddings",status="422"') >= 1
    assert metric_value(text, "rematch_batch_size_count") >= 1
    assert metric_value(text, "rematch_request_latency_seconds_count", 'route="/v1/embeddings"') >= 2
    assert "rematch_queue_wait_seconds_bucket" in text and "rematch_requests_in_flight" in text
