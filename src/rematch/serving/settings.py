"""What an operator decides about a running server: where it listens, who may call it, and its limits.

Every limit here exists so one request cannot take the server down for everyone else: a
huge body, a decompression-bomb image, a batch of ten thousand inputs, a k of a million.
The defaults are safe for a server on the operator's own machine (loopback, no files).
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ServeSettings:
    """Limits and policies of one ``rematch serve`` process (see docs/serving.md)."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    """With a key, every route except ``/``, ``/static/*``, ``/health`` and ``/metrics`` needs
    ``Authorization: Bearer KEY``."""
    protect_metrics: bool = False
    """With an API key, ``/metrics`` needs it too. Off by default: a Prometheus scraper has no token
    (vLLM and TEI leave ``/metrics`` open as well), and the metrics hold counts, not data."""
    allow_files: str | os.PathLike | None = None
    """Root under which requests may name local image files; None refuses every path."""
    max_batch: int = 32
    """Most items one model forward takes (requests are merged up to this)."""
    max_wait_ms: float = 5.0
    """How long the model worker waits for more requests to fill a batch."""
    max_body_bytes: int = 16 * 1024 * 1024
    max_image_pixels: int = 25_000_000
    """Largest image (width x height, as the file declares it) a request may send."""
    max_file_bytes: int = 64 * 1024 * 1024
    """Largest local image file (under ``allow_files``) a request may name."""
    max_inputs: int = 2048
    """Most items in one /v1/embeddings request (OpenAI's own limit)."""
    max_documents: int = 1000
    """Most documents in one /v1/rerank request."""
    max_k: int = 100
    """Largest ``k`` (and ``rerank``) of one /v1/search request."""
    max_queued_items: int = 8192
    """Items waiting for the model beyond which new requests get 503 (back-pressure, bounded memory)."""
    shutdown_timeout_s: float = 30.0
    """How long a shutdown waits for in-flight requests to finish."""
    served_model_name: str = "rematch"
    """The ``model`` name /v1/models lists and answers carry (see :mod:`rematch.serving.names`)."""
    model_aliases: tuple[str, ...] = ("rematch",)
    """Other ``model`` names requests may give (vLLM's extra ``--served-model-name`` values)."""

    @property
    def model_names(self) -> tuple[str, ...]:
        """Every name a request's ``model`` may carry, the served name first."""
        return tuple(dict.fromkeys((self.served_model_name, *self.model_aliases)))

    def serves(self, name: str) -> bool:
        return name in self.model_names

    def validate(self) -> None:
        """Refuse nonsense before the model loads (each message names the flag)."""
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be between 0 and 65535, got {self.port}")
        if self.api_key is not None and (not self.api_key.strip() or any(c.isspace() for c in self.api_key)):
            raise ValueError("--api-key must be a non-empty string without whitespace")
        for name in ("max_batch", "max_body_bytes", "max_image_pixels", "max_file_bytes", "max_inputs",
                     "max_documents", "max_k", "max_queued_items"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
        if not 0 <= self.max_wait_ms <= 10_000:
            raise ValueError(f"--max-wait-ms must be between 0 and 10000, got {self.max_wait_ms}")
        if self.shutdown_timeout_s < 0:
            raise ValueError(f"shutdown timeout must be >= 0, got {self.shutdown_timeout_s}")
        for name in self.model_names:
            if not isinstance(name, str) or not name.strip():
                raise ValueError(f"--served-model-name must be non-empty names, got {name!r}")
        if self.allow_files is not None and not Path(self.allow_files).is_dir():
            raise ValueError(f"--allow-files {self.allow_files}: not a directory")

    @property
    def files_root(self) -> Path | None:
        """The resolved ``allow_files`` root (symlinks followed once, here, by the operator's choice)."""
        return None if self.allow_files is None else Path(self.allow_files).resolve()

    @property
    def is_loopback(self) -> bool:
        """Whether the server only listens on this machine."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False
