"""Request bodies of the API, with the field names of the clients people already use: OpenAI
(and vLLM's chat-style ``messages``), Cohere / Jina rerank, TEI's ``/embed`` and ``/rerank``,
vLLM's ``/score``.

Strict: an unknown field or a value of the wrong JSON type is a 422 naming the field, never
silently dropped or coerced (``"k": "5"`` is an error, not 5). Fields holding items
(``input``, ``query``, ``documents``) are typed ``Any`` here and checked by
:mod:`rematch.serving.inputs`, which names the item index (``input[3].image``) and decodes
images off the event loop.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class EmbeddingRequest(_Strict):
    """``POST /v1/embeddings``: OpenAI's shape plus ``input_type``, or vLLM's chat-style ``messages``."""

    input: Any = Field(default=None, description="a string, a list of strings, or a list of {text, image, "
                                                 "instruction} items; images as data: URLs (or paths under "
                                                 "--allow-files)")
    messages: Any = Field(default=None, description="vLLM's chat-style input instead of input: a system message "
                                                    "(the instruction) and a user message of text and image_url "
                                                    "parts; one item per request")
    model: str | None = None
    input_type: Literal["query", "document"] = "query"
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, description="accepted only if equal to the model's dimension")
    user: str | None = Field(default=None, description="accepted for OpenAI compatibility; not used")


class RerankRequest(_Strict):
    """``POST /v1/rerank`` (Cohere / Jina shape), scored by the matching head."""

    query: Any
    documents: Any
    top_n: int | None = Field(default=None, ge=1)
    model: str | None = None
    return_documents: bool = False


class SearchRequest(_Strict):
    """``POST /v1/search`` on the index the server was started with."""

    query: Any
    k: int = Field(default=10, ge=1)
    rerank: Any = Field(default=False, description="true (rerank the top k), false, or N (rerank the top N)")
    model: str | None = None

    @field_validator("rerank", mode="plain")
    @classmethod
    def _rerank(cls, value: Any) -> bool | int:
        if isinstance(value, bool) or (isinstance(value, int) and value >= 0):
            return value
        raise ValueError("expected true, false or an integer >= 0")


class TeiEmbedRequest(_Strict):
    """``POST /embed`` (text-embeddings-inference's shape; items with images are accepted too)."""

    inputs: Any = Field(description="a string, a list of strings, or a list of {text, image, instruction} items")
    normalize: bool = Field(default=True, description="the vectors are always L2-normalised; false is refused")
    truncate: bool | None = Field(default=None, description="accepted; texts are cut at the model's "
                                                            "max_text_tokens either way")
    truncation_direction: Literal["right", "Right"] = "right"
    prompt_name: Literal["query", "document"] | None = Field(
        default=None, description="the role, as the sentence-transformers export names its prompts (default query)")
    dimensions: int | None = Field(default=None, description="accepted only if equal to the model's dimension")


class TeiRerankRequest(_Strict):
    """``POST /rerank`` (text-embeddings-inference's shape), scored by the matching head."""

    query: Any
    texts: Any
    raw_scores: bool = Field(default=False, description="scores are p(Yes) in [0, 1]; true is refused")
    return_text: bool = False
    truncate: bool | None = None
    truncation_direction: Literal["right", "Right"] = "right"


class ScoreRequest(_Strict):
    """``POST /score`` and ``/v1/score`` (vLLM's shape): the cosine of query and document embeddings."""

    text_1: Any = Field(description="the query: a string or item, or a list of them")
    text_2: Any = Field(description="the documents: a string or item, or a list of them")
    model: str | None = None
    user: str | None = Field(default=None, description="accepted for OpenAI compatibility; not used")
