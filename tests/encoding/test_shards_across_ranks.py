"""``rematch encode`` and ``rematch index build`` under torch.distributed: 2 CPU ranks (gloo) give
the vectors of one process, each rank encoding its share of the shards, and resume from shards
an interrupted run left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.support.ports import free_port
from rematch import ReMatchModel
from rematch.cli import main
from rematch.data.items import as_items
from rematch.retrieval import Index
from rematch.encoding.shards import encode_to_npy

pytestmark = pytest.mark.distributed  # torchrun, two gloo processes

SHARD_SIZE = "3"


def run_two_ranks(argv: list[str], cwd: Path) -> list[str]:
    """``rematch ARGV`` on 2 gloo ranks, as torchrun would start them; returns each rank's output."""
    port = free_port()
    processes = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "CUDA_VISIBLE_DEVICES": ""}
        code = "import sys, torch; torch.set_num_threads(1); from rematch.cli import main; sys.exit(main(sys.argv[1:]))"
        processes.append(subprocess.Popen([sys.executable, "-c", code, *argv], env=env, cwd=cwd,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        outputs = [process.communicate(timeout=180)[0] for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    assert [p.returncode for p in processes] == [0, 0], outputs
    return outputs


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, shape_images):
    root = tmp_path_factory.mktemp("distributed")
    ReMatchModel.tiny(num_tokens=4, min_pixels=28 * 28, max_pixels=56 * 56).save_pretrained(root / "model")
    for index, image in enumerate(shape_images):
        image.save(root / f"shape{index}.png")
    rows = [{"id": f"t{n}", "text": f"a small shape number {n}"} for n in range(8)]
    rows += [{"id": f"i{n}", "image": str(root / f"shape{n}.png"), "text": "a picture"} for n in range(3)]
    (root / "items.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


class Interrupted(RuntimeError):
    pass


class StopsAfterOneShard:
    """The real model that crashes on its second shard (a killed job)."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def encode(self, items, **kwargs):
        self.calls += 1
        if self.calls > 1:
            raise Interrupted("simulated crash")
        return self.model.encode(items, **kwargs)

    def fingerprint(self) -> str:
        return self.model.fingerprint()


def test_encode_on_two_ranks_equals_one_process_and_resumes(workspace, tmp_path):
    common = ["encode", "--model", str(workspace / "model"), "--allow-untrained", "--input",
              str(workspace / "items.jsonl"), "--role", "document", "--shard-size", SHARD_SIZE, "--out"]
    assert main(common + [str(tmp_path / "single.npy")]) == 0
    single = np.load(tmp_path / "single.npy")
    assert single.shape[0] == 11 and not (tmp_path / ".single.npy.shards").exists()

    # an interrupted run leaves its first shard behind; two ranks finish the job
    model = ReMatchModel.from_pretrained(workspace / "model", device="cpu")
    items = as_items([json.loads(line) for line in (workspace / "items.jsonl").read_text().splitlines()])
    with pytest.raises(Interrupted):
        encode_to_npy(StopsAfterOneShard(model), items, tmp_path / "two.npy", role="document", shard_size=3, log=None)
    assert [p.name for p in sorted((tmp_path / ".two.npy.shards").iterdir())] == ["shard-000000.npz"]

    outputs = run_two_ranks(common + [str(tmp_path / "two.npy")], cwd=workspace)
    np.testing.assert_allclose(np.load(tmp_path / "two.npy"), single, atol=1e-6)
    assert not (tmp_path / ".two.npy.shards").exists()
    assert "reused 1 finished shard(s)" in outputs[0] and "wrote 11 x 128 document embeddings" in outputs[0]
    assert "wrote" not in outputs[1]  # only rank 0 writes
    # the work was split: rank 0 encoded shard 3 (shard 1 was reused), rank 1 shards 2 and 4
    assert "shard 3/4" in outputs[0] and "shard 1/4" not in outputs[0]
    assert "shard 2/4" in outputs[1] and "shard 4/4" in outputs[1]


def test_index_build_on_two_ranks_equals_one_process(workspace, tmp_path):
    common = ["index", "build", "--model", str(workspace / "model"), "--allow-untrained", "--corpus",
              str(workspace / "items.jsonl"), "--shard-size", SHARD_SIZE, "--out"]
    assert main(common + [str(tmp_path / "single")]) == 0
    outputs = run_two_ranks(common + [str(tmp_path / "two")], cwd=workspace)
    single, two = Index.load(tmp_path / "single"), Index.load(tmp_path / "two")
    assert two.ids == single.ids and two.records == single.records
    np.testing.assert_allclose(two.faiss_index.reconstruct_n(0, 11), single.faiss_index.reconstruct_n(0, 11),
                               atol=1e-6)
    assert two.fingerprint == single.fingerprint
    assert "wrote a flat index of 11 items" in outputs[0] and "wrote a flat index" not in outputs[1]
    assert "shard 2/4" in outputs[1] and "shard 2/4" not in outputs[0]
    assert not (tmp_path / "two" / "shards").exists()
