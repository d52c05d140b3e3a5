"""The request shapes of other servers, each sent by the client people use for it, on a loopback port.

vLLM's chat-style ``messages`` (httpx: vLLM's own client is the ``openai`` package, whose
``embeddings.create`` cannot send ``messages``), TEI's ``/embed`` (huggingface_hub's
``InferenceClient``, which is how Python talks to TEI) and ``/rerank``, vLLM's ``/score``.
Every vector equals ``ReMatchModel.encode`` (cosine >= 0.9999) and every rerank score the
library's ``matching_probabilities``. Each route was a 404 or a 422 before issue 25.
"""

from __future__ import annotations

import numpy as np
import pytest
from tests.support.serving import (
    API_KEY,
    client,
    cosines,
    data_url,
    png_bytes,
    running_server,
    shape_image,
    tiny_serving_model,
)

from rematch.retrieval.rerank import matching_probabilities

MIN_COSINE = 0.9999


@pytest.fixture(scope="module")
def model():
    return tiny_serving_model()


@pytest.fixture(scope="module")
def files_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("allowed")
    (root / "a-folder").mkdir()
    return root


@pytest.fixture(scope="module")
def server(model, files_root):
    with running_server(model, api_key=API_KEY, allow_files=files_root, max_batch=8, max_wait_ms=2) as running:
        yield running


@pytest.fixture()
def http(server):
    with client(server) as session:
        yield session


def test_vllm_chat_style_messages_embed_one_item(http, model):
    red = shape_image("red", "circle")
    cases = [  # (messages, the item ReMatchModel.encode is given)
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png_bytes(red))}},
                                       {"type": "text", "text": "Represent the given image."}]}],
         {"image": red, "text": "Represent the given image."}),
        ([{"role": "system", "content": "Find the picture that matches."},
          {"role": "user", "content": [{"type": "text", "text": "a large red circle"}]}],
         {"text": "a large red circle", "instruction": "Find the picture that matches."}),
        ([{"role": "user", "content": "a small blue star"}], {"text": "a small blue star"}),
        ([{"role": "user", "content": [{"type": "text", "text": "What shape is this? "},
                                       {"type": "image_url", "image_url": data_url(png_bytes(red))}]}],
         {"image": red, "text": "What shape is this? <|image_1|>"}),  # an image after text stays after it
    ]
    for role in ("query", "document"):
        for messages, item in cases:
            answer = http.post("/v1/embeddings", json={"model": "rematch", "messages": messages,
                                                      "input_type": role, "encoding_format": "float"})
            assert answer.status_code == 200, answer.text
            (row,) = answer.json()["data"]
            assert cosines(np.array(row["embedding"]), model.encode([item], role=role)[0]) >= MIN_COSINE, item


def test_messages_that_are_not_one_item_are_refused_naming_the_part(http):
    image = {"type": "image_url", "image_url": {"url": data_url(png_bytes(shape_image("red", "circle")))}}
    for body, status, param, words in (
        ({"messages": [{"role": "user", "content": [image, image]}]}, 400, "messages[0].content[1]", "second image"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages[0].role", "system, user"),
        ({"messages": [{"role": "system", "content": "x"}]}, 400, "messages", "no user message"),
        ({"messages": [{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]}, 400,
         "messages[0].content[0].type", "'text' or 'image_url'"),
        ({"messages": [{"role": "user", "content": "x"}], "input": "y"}, 422, "messages", "not both"),
        ({"messages": "a red circle"}, 422, "messages", "list of {role, content}"),
    ):
        answer = http.post("/v1/embeddings", json=body)
        assert answer.status_code == status, (body, answer.text)
        error = answer.json()["error"]
        assert error["param"] == param and words in error["message"], (body, error)


def test_tei_embed_with_huggingface_hub_inference_client(server, model):
    from huggingface_hub import InferenceClient

    tei = InferenceClient(base_url=server.url + "/embed", api_key=API_KEY)
    texts = ["a red circle", "two green squares"]
    queries = tei.feature_extraction(texts)
    documents = tei.feature_extraction(texts, prompt_name="document", normalize=True)
    assert queries.shape == (2, model.hidden_size)
    assert cosines(queries, model.encode(texts, role="query")).min() >= MIN_COSINE
    assert cosines(documents, model.encode(texts, role="document")).min() >= MIN_COSINE
    single = tei.feature_extraction("a red circle")
    assert cosines(single.reshape(-1), model.encode(["a red circle"], role="query")[0]) >= MIN_COSINE


def test_tei_embed_takes_items_with_images_and_refuses_what_it_cannot_do(http, model):
    red = shape_image("red", "circle")
    answer = http.post("/embed", json={"inputs": [{"image": data_url(png_bytes(red))}, "a red circle"]})
    assert answer.status_code == 200
    assert cosines(np.array(answer.json()), model.encode([{"image": red}, "a red circle"])).min() >= MIN_COSINE
    refused = http.post("/embed", json={"inputs": "x", "normalize": False})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "normalize"
    assert http.post("/embed", json={"inputs": "x", "prompt_name": "passage"}).status_code == 422


def test_tei_rerank_returns_index_and_score_best_first(http, model):
    red = shape_image("red", "circle")
    texts = ["a small blue star", "a large red circle", {"image": data_url(png_bytes(red))}]
    answer = http.post("/rerank", json={"query": "a large red circle", "texts": texts, "return_text": True})
    assert answer.status_code == 200, answer.text
    results = answer.json()
    expected = matching_probabilities(model, "a large red circle", ["a small blue star", "a large red circle",
                                                                     {"image": red}])
    assert [row["index"] for row in results] == [int(i) for i in np.argsort(-expected, kind="stable")]
    np.testing.assert_allclose([row["score"] for row in results], np.sort(expected)[::-1], atol=1e-5)
    assert {row["index"]: row["text"] for row in results} == {0: "a small blue star", 1: "a large red circle",
                                                                2: None}
    assert set(results[0]) == {"index", "score", "text"}
    plain = http.post("/rerank", json={"query": "q", "texts": ["a", "b"]}).json()
    assert all(set(row) == {"index", "score"} for row in plain)
    assert http.post("/rerank", json={"query": "q", "texts": ["a"], "raw_scores": True}).status_code == 400


def test_vllm_score_is_the_cosine_of_query_and_document_embeddings(http, model):
    documents = ["a small blue star", "a large red circle"]
    for path in ("/score", "/v1/score"):
        answer = http.post(path, json={"model": "rematch", "text_1": "a large red circle", "text_2": documents})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["object"] == "list" and body["id"].startswith("score-") and body["model"] == "rematch"
        expected = model.encode(["a large red circle"], role="query") @ model.encode(documents, role="document").T
        np.testing.assert_allclose([row["score"] for row in body["data"]], expected[0], atol=1e-4)
        assert [(row["index"], row["object"]) for row in body["data"]] == [(0, "score"), (1, "score")]
    pairwise = http.post("/score", json={"text_1": ["a", "b"], "text_2": ["c", "d"]}).json()["data"]
    queries, docs = model.encode(["a", "b"], role="query"), model.encode(["c", "d"], role="document")
    np.testing.assert_allclose([row["score"] for row in pairwise], (queries * docs).sum(axis=1), atol=1e-4)
    mismatched = http.post("/score", json={"text_1": ["a", "b"], "text_2": ["c", "d", "e"]})
    assert mismatched.status_code == 400 and mismatched.json()["error"]["param"] == "text_1"


def test_a_directory_under_allow_files_is_a_400_not_a_500(http):
    for name in ("a-folder", "."):
        answer = http.post("/v1/embeddings", json={"input": [{"image": name}]})
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert error["param"] == "input[0].image" and "is a directory" in error["message"]


def test_metrics_are_open_by_default_and_closed_by_protect_metrics(model):
    for protect, anonymous_status in ((False, 200), (True, 401)):
        with running_server(model, api_key=API_KEY, protect_metrics=protect) as running:
            with client(running, key=None) as anonymous, client(running) as keyed:
                assert anonymous.get("/metrics").status_code == anonymous_status
                assert anonymous.get("/health").status_code == 200
                assert keyed.get("/metrics").status_code == 200
                assert anonymous.post("/embed", json={"inputs": "x"}).status_code == 401
