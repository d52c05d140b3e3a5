"""The README's Serving examples, run as written against a real ``rematch serve`` process.

The official ``openai`` package runs the README's Python block (only the port differs: the
test's server listens on a free loopback port, not 8000), with the name the README uses
(``model="rematch"``) against a server started the way the README starts one (``--model DIR
--api-key secret``, no ``--served-model-name``). Before issue 25 the server answered to its
filesystem path only, so this example got a 404.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest

from rematch import ReMatchModel
from tests.support import REPO
from tests.support.ports import free_port
from tests.support.serving import cosines, shape_image, wait_until_healthy

openai = pytest.importorskip("openai")


def readme_serving_block(language: str) -> str:
    """The first ``language`` code block of the README's Serving section."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Serving\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(rf"```{language}\n(.*?)```", section, re.DOTALL)
    assert match, f"no {language} block in the README's Serving section"
    return match.group(1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("models") / "shapes-model"
    ReMatchModel.tiny(num_tokens=4, seed=3, max_pixels=56 * 56).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def served(model_dir):
    """``rematch serve --model DIR --api-key secret`` as the README starts it (plus a free port)."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "rematch.cli", "serve", "--model", str(model_dir), "--allow-untrained",
         "--device", "cpu", "--port", str(port), "--api-key", "secret", "--log-level", "warning"],
        env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(process, url)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()


def test_the_readme_openai_example_runs_as_written(served, model_dir, tmp_path, monkeypatch):
    block = readme_serving_block("python")
    assert 'model="rematch"' in block and 'base_url="http://127.0.0.1:8000/v1"' in block
    shape_image("red", "circle").save(tmp_path / "scene.png")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block.replace("http://127.0.0.1:8000", served), "README.md", "exec"), namespace)  # noqa: S102

    model = ReMatchModel.from_pretrained(model_dir, device="cpu")
    queries = np.array([row.embedding for row in namespace["queries"].data])
    documents = np.array([row.embedding for row in namespace["documents"].data])
    assert cosines(queries, model.encode(["a red circle", "a blue star"], role="query")).min() >= 0.9999
    expected = model.encode([{"image": str(tmp_path / "scene.png")}, {"text": "a red circle"}], role="document")
    assert cosines(documents, expected).min() >= 0.9999
    np.testing.assert_allclose(namespace["scores"], queries @ documents.T, atol=1e-6)
    assert namespace["queries"].model == "shapes-model"  # answers carry the short name, never the path


def test_the_served_name_is_the_directory_name_and_rematch_is_accepted(served, model_dir):
    client = openai.OpenAI(base_url=served + "/v1", api_key="secret")
    listed = [model.id for model in client.models.list().data]
    assert listed == ["shapes-model"] and str(model_dir) not in str(listed)
    for name in ("shapes-model", "rematch"):
        assert len(client.embeddings.create(model=name, input="a red circle").data) == 1
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.embeddings.create(model="gpt-4", input="a red circle")
