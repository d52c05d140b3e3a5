"""Shared pieces of the ``rematch serve`` tests: a tiny model, a small indexed corpus, a server on a thread."""

from __future__ import annotations

import base64
import contextlib
import io
import re
import subprocess
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from rematch import ReMatchModel
from rematch.world.scenes import Scene, ShapeObject, render
from rematch.retrieval.index import Index
from rematch.serving import ServerThread, ServeSettings, create_app

API_KEY = "test-key-123"
SHAPES = [("red", "circle"), ("blue", "star"), ("green", "square"), ("yellow", "triangle")]


def tiny_serving_model() -> ReMatchModel:
    """Small and fast: K = 4 and images of at most 56 x 56 pixels."""
    return ReMatchModel.tiny(num_tokens=4, seed=0, max_pixels=56 * 56)


def shape_image(colour: str, shape: str, side: int = 56) -> Image.Image:
    return render(Scene((ShapeObject(colour, shape, "large", 0.5, 0.5),)), side=side)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def write_corpus(root: Path) -> tuple[list[dict], list[str]]:
    """Four shape images under ``root`` and three texts, as items with ids."""
    items, ids = [], []
    for colour, shape in SHAPES:
        path = root / f"{colour}_{shape}.png"
        shape_image(colour, shape).save(path)
        items.append({"image": str(path)})
        ids.append(f"img-{colour}-{shape}")
    for text in ("a large red circle", "a small blue star", "two green squares"):
        items.append({"text": text})
        ids.append("txt-" + text.replace(" ", "-"))
    return items, ids


def build_index(model: ReMatchModel, root: Path) -> Index:
    items, ids = write_corpus(root)
    return Index.build(model, items, ids)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def metric_value(text: str, name: str, labels: str = "") -> float:
    """One sample of a Prometheus text exposition (0 when absent)."""
    pattern = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else "") + r" ([0-9.e+-]+)"
    match = re.search(r"^" + pattern + r"$", text, flags=re.MULTILINE)
    return float(match.group(1)) if match else 0.0


@contextlib.contextmanager
def running_server(model, index=None, **settings):
    """A server on an ephemeral loopback port; afterwards its threads are gone (checked)."""
    before = set(threading.enumerate())
    server = ServerThread(create_app(model, index, ServeSettings(port=0, **settings)))
    server.start()
    try:
        yield server
    finally:
        server.stop()
    leaked = [thread.name for thread in set(threading.enumerate()) - before
              if thread.is_alive() and _ours(thread)]
    assert not leaked, f"the server left threads running: {leaked}"


def _ours(thread: threading.Thread) -> bool:
    """A thread the server started that is still running (tqdm's shared monitor thread is not the server's)."""
    if type(thread).__name__ == "TMonitor":
        return False
    thread.join(timeout=2.0)  # worker threads of the server's thread pool exit with its event loop
    return thread.is_alive()


def client(server, key: str | None = API_KEY, **kwargs) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=server.url, headers=headers, timeout=120.0, **kwargs)


def wait_until_healthy(process: subprocess.Popen, url: str, deadline_s: float = 240) -> None:
    """Wait for a ``rematch serve`` process to answer ``GET /health`` with 200; fail at once if the
    process exits (its stderr in the message) or when ``deadline_s`` passes."""
    deadline = time.monotonic() + deadline_s
    while True:
        assert process.poll() is None, process.communicate()[1]
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "rematch serve did not come up"
        time.sleep(0.2)
