"""``rematch serve`` refuses what it must: bad requests (each named), missing keys, big bodies, files outside
the allowed root; and it keeps serving afterwards."""

from __future__ import annotations

import os

import pytest
from tests.support.serving import (
    API_KEY,
    build_index,
    client,
    data_url,
    png_bytes,
    running_server,
    shape_image,
    tiny_serving_model,
)

from rematch.serving.errors import BadValue
from rematch.serving.images import read_allowed_file
from rematch.serving.settings import ServeSettings

MAX_BODY = 300_000
MAX_PIXELS = 100 * 100


@pytest.fixture(scope="module")
def model():
    return tiny_serving_model()


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """An allowed root with an image and an escaping symlink, and an image outside it."""
    base = tmp_path_factory.mktemp("tree")
    root, outside = base / "allowed", base / "secret"
    root.mkdir()
    outside.mkdir()
    shape_image("red", "circle").save(root / "ok.png")
    shape_image("blue", "star").save(outside / "private.png")
    os.symlink(outside / "private.png", root / "link.png")
    os.symlink(outside, root / "linked_dir")
    os.mkfifo(root / "pipe.png")
    return root, outside


@pytest.fixture(scope="module")
def server(model, tree, tmp_path_factory):
    index = build_index(model, tmp_path_factory.mktemp("corpus"))
    with running_server(model, index, api_key=API_KEY, allow_files=tree[0], max_body_bytes=MAX_BODY,
                        max_image_pixels=MAX_PIXELS, max_batch=4, max_wait_ms=2) as running:
        yield running


def _bad_requests(tree):
    root, outside = tree
    good = data_url(png_bytes(shape_image("red", "circle")))
    big = data_url(png_bytes(shape_image("red", "circle", side=112)))  # 112 x 112 > 100 x 100
    garbage = data_url(b"\x89PNG\r\n\x1a\n not really a png")
    embed = "/v1/embeddings"
    return [  # route, body, status, param, words the message must hold
        (embed, {"input": "x", "colour": "red"}, 422, "colour", "unknown field"),
        (embed, {"input": ["ok", {"text": "x", "colour": "red"}]}, 422, "input[1].colour", "unknown field"),
        (embed, {"input": [{"text": 3}]}, 422, "input[0].text", "expected a string"),
        (embed, {"input": 5}, 422, "input", "expected a string or a list"),
        (embed, {"input": [1, 2, 3]}, 422, "input", "token-id input is not supported"),
        (embed, {"input": ["fine", None]}, 422, "input[1]", "got null"),
        (embed, {"input": ["x"], "input_type": "passage"}, 422, "input_type", "'query' or 'document'"),
        (embed, {"input": ["x"], "encoding_format": "int8"}, 422, "encoding_format", "'float' or 'base64'"),
        (embed, {}, 422, "input", "Field required"),
        (embed, {"input": []}, 400, "input", "empty list"),
        (embed, {"input": ["a", {"instruction": "only"}]}, 400, "input[1]", "neither text nor image"),
        (embed, {"input": ["a", {"image": garbage}]}, 400, "input[1].image", "cannot decode image"),
        (embed, {"input": [{"image": "data:image/png;base64,@@@"}]}, 400, "input[0].image", "not valid base64"),
        (embed, {"input": [{"image": "data:text/plain;base64,aGk="}]}, 400, "input[0].image", "media type"),
        (embed, {"input": ["a", "b", {"image": big}]}, 400, "input[2].image", "over this server's limit"),
        (embed, {"input": [{"image": "https://example.com/cat.png"}]}, 400, "input[0].image", "remote URLs"),
        (embed, {"input": [{"image": "../secret/private.png"}]}, 400, "input[0].image", "outside the directory"),
        (embed, {"input": [{"image": str(outside / "private.png")}]}, 400, "input[0].image", "outside"),
        (embed, {"input": [{"image": "link.png"}]}, 400, "input[0].image", "outside"),
        (embed, {"input": [{"image": "linked_dir/private.png"}]}, 400, "input[0].image", "outside"),
        (embed, {"input": [{"image": "missing.png"}]}, 400, "input[0].image", "not found"),
        (embed, {"input": [{"image": "pipe.png"}]}, 400, "input[0].image", "not a regular file"),
        (embed, {"input": "x", "model": "gpt-4"}, 404, "model", "not served here"),
        (embed, {"input": "x", "dimensions": 64}, 400, "dimensions", "128 dimensions"),
        ("/v1/rerank", {"query": "q", "documents": "one"}, 422, "documents", "expected a list"),
        ("/v1/rerank", {"query": "q", "documents": ["a", {"image": good, "alt": 1}]}, 422, "documents[1].alt",
         "unknown field"),
        ("/v1/rerank", {"query": "q", "documents": ["a"], "top_n": 0}, 422, "top_n", "greater than or equal"),
        ("/v1/rerank", {"query": {"image": garbage}, "documents": ["a"]}, 400, "query.image", "cannot decode"),
        ("/v1/search", {"query": "q", "k": "5"}, 422, "k", "valid integer"),
        ("/v1/search", {"query": "q", "k": 1000}, 400, "k", "at most 100"),
        ("/v1/search", {"query": "q", "rerank": -1}, 422, "rerank", "true, false or an integer"),
        ("/v1/search", {"query": {"text": "q", "image": big}}, 400, "query.image", "pixels"),
    ]


def test_bad_requests_get_their_status_and_a_message_naming_the_field(server, tree):
    with client(server) as http:
        for route, body, status, param, words in _bad_requests(tree):
            answer = http.post(route, json=body)
            assert answer.status_code == status, (route, body, answer.text)
            error = answer.json()["error"]
            assert error["param"] == param, (body, error)
            assert words in error["message"] and error["message"].startswith(param), (body, error)
        invalid_json = http.post("/v1/embeddings", content=b'{"input": ', headers={"content-type": "application/json"})
        assert invalid_json.status_code == 422 and "not valid JSON" in invalid_json.json()["error"]["message"]
        still = http.post("/v1/embeddings", json={"input": ["a red circle", {"image": "ok.png"}]})
        assert still.status_code == 200 and len(still.json()["data"]) == 2


def test_requests_without_the_api_key_get_401(server):
    with client(server, key=None) as anonymous, client(server, key="wrong-key") as wrong:
        for http in (anonymous, wrong):
            for method, path in (("post", "/v1/embeddings"), ("post", "/v1/rerank"), ("post", "/v1/search"),
                                 ("post", "/embed"), ("post", "/rerank"), ("post", "/score"), ("post", "/v1/score"),
                                 ("get", "/v1/models"), ("get", "/v1/thumbnails/0")):
                answer = http.request(method.upper(), path, json={"input": "x"} if method == "post" else None)
                assert answer.status_code == 401, path
                assert answer.headers["www-authenticate"] == "Bearer"
                assert "API key" in answer.json()["error"]["message"]
        assert anonymous.get("/health").status_code == 200 and anonymous.get("/").status_code == 200
        # Prometheus scrapers carry no token: /metrics is open unless --protect-metrics (vLLM and TEI do the same)
        assert anonymous.get("/metrics").status_code == 200
    with client(server) as http:
        assert http.post("/v1/embeddings", json={"input": "x"}).status_code == 200


def test_bodies_over_the_limit_get_413_declared_or_streamed(server):
    payload = b'{"input": "' + b"a" * (MAX_BODY + 10) + b'"}'

    def chunks():
        for start in range(0, len(payload), 65536):
            yield payload[start:start + 65536]

    with client(server) as http:
        declared = http.post("/v1/embeddings", content=payload, headers={"content-type": "application/json"})
        assert declared.status_code == 413 and "limit of 300,000 bytes" in declared.json()["error"]["message"]
        streamed = http.post("/v1/embeddings", content=chunks(), headers={"content-type": "application/json"})
        assert streamed.status_code == 413
    with client(server) as http:
        assert http.post("/v1/embeddings", json={"input": "still here"}).status_code == 200


def test_no_path_outside_the_allowed_root_is_ever_opened(tree, monkeypatch):
    """Every escape is refused before any file is opened; the one allowed file is read."""
    root, outside = tree
    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda path, *args, **kwargs: opened.append(str(path)) or real_open(
        path, *args, **kwargs))
    resolved_root = root.resolve()
    for attempt in ("../secret/private.png", str(outside / "private.png"), "link.png", "linked_dir/private.png",
                    "~/private.png", "/etc/passwd", "ok.png/../../secret/private.png"):
        with pytest.raises(BadValue, match="outside"):
            read_allowed_file(attempt, "input[0].image", resolved_root, 1_000_000)
    assert opened == []
    assert read_allowed_file("ok.png", "input[0].image", resolved_root, 1_000_000).startswith(b"\x89PNG")
    assert opened == [str(resolved_root / "ok.png")]
    with pytest.raises(BadValue, match="not allowed on this server"):
        read_allowed_file("ok.png", "input[0].image", None, 1_000_000)


def test_settings_refuse_nonsense_naming_the_flag(tmp_path):
    for fields, flag in (({"max_batch": 0}, "--max-batch"), ({"max_wait_ms": -1}, "--max-wait-ms"),
                         ({"port": 70000}, "--port"), ({"api_key": "has space"}, "--api-key"),
                         ({"allow_files": tmp_path / "nope"}, "--allow-files"),
                         ({"max_body_bytes": 0}, "--max-body-bytes")):
        with pytest.raises(ValueError, match=flag):
            ServeSettings(**fields).validate()
    assert ServeSettings().is_loopback and not ServeSettings(host="0.0.0.0").is_loopback
