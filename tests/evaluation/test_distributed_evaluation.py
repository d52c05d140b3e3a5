"""Evaluation under torch.distributed: 2 CPU processes (gloo) give the single-process results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.support.ports import free_port
from rematch import ReMatchModel
from rematch.evaluation import evaluate_mmeb, evaluate_retrieval

pytestmark = pytest.mark.distributed  # torchrun, two gloo processes

WORKER = textwrap.dedent('''
    import json, sys
    import torch
    torch.set_num_threads(1)
    from rematch import Item, ReMatchModel
    from rematch.evaluation import evaluate_mmeb, evaluate_retrieval
    from rematch.distributed import rank_and_world, torchrun_session
    sys.path.insert(0, sys.argv[2])
    from fixture import examples, corpus

    session = torchrun_session()
    session.__enter__()
    rank, world = rank_and_world()

    class Counting:
        def __init__(self, model):
            self.model, self.items, self.config = model, 0, model.config
        def encode(self, items, **kw):
            items = list(items)
            self.items += len(items)
            return self.model.encode(items, **kw)
        def fingerprint(self):
            return self.model.fingerprint()

    model = Counting(ReMatchModel.tiny(seed=0))
    summary = evaluate_mmeb(model, examples(), sys.argv[1] + "/mmeb", log=None)
    retrieval = evaluate_retrieval(model, *corpus(), log=None)
    with open(f"{sys.argv[1]}/rank{rank}.json", "w") as handle:
        json.dump({"world": world, "encoded": model.items, "summary": summary, "retrieval": retrieval}, handle)
    session.__exit__(None, None, None)
''')

FIXTURE = textwrap.dedent('''
    from rematch import Item
    from rematch.data.records import EvalExample, RowRef

    def examples():
        pool = [Item(text=f"candidate {n}") for n in range(7)]
        rows = [EvalExample(Item(text=f"query {n}"), tuple(pool[(n + j) % 7] for j in range(4)), "CIRR",
                            RowRef("c.jsonl", n)) for n in range(9)]
        return {"CIRR": rows, "GQA": rows[:5]}

    def corpus():
        queries = [Item(text=f"question {n}") for n in range(5)]
        documents = [Item(text=f"document {n}") for n in range(11)]
        qrels = {f"q{n}": {f"d{n}": 1.0, f"d{n + 5}": 2.0} for n in range(5)}
        return [f"q{n}" for n in range(5)], queries, [f"d{n}" for n in range(11)], documents, qrels
''')


def test_two_gloo_ranks_match_one_process(tmp_path):
    (tmp_path / "fixture.py").write_text(FIXTURE)
    (tmp_path / "worker.py").write_text(WORKER)
    port = free_port()
    processes = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        processes.append(subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), str(tmp_path),
                                           str(tmp_path)], env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
    try:
        outputs = [process.communicate(timeout=120)[0] for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    assert [p.returncode for p in processes] == [0, 0], outputs

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    sys.path.insert(0, str(tmp_path))
    try:
        from fixture import corpus, examples
    finally:
        sys.path.remove(str(tmp_path))
    model = ReMatchModel.tiny(seed=0)
    single = evaluate_mmeb(model, examples(), None, log=None)
    single_retrieval = evaluate_retrieval(model, *corpus(), log=None)

    for result in ranks:
        assert result["world"] == 2
        for name, expected in single["subsets"].items():
            got = result["summary"]["subsets"][name]
            for metric in ("hit@1", "hit@5", "mrr", "count"):
                assert got[metric] == pytest.approx(expected[metric], abs=1e-6), (name, metric)
        assert result["summary"]["groups"]["overall"]["hit@1"] == pytest.approx(
            single["groups"]["overall"]["hit@1"], abs=1e-6)
        assert result["retrieval"]["metrics"] == pytest.approx(single_retrieval["metrics"], abs=1e-6)
    # the work was split: each rank encoded part, together exactly what one process encodes
    assert all(0 < r["encoded"] for r in ranks)
    assert sum(r["encoded"] for r in ranks) == single["throughput"]["items_encoded"] + \
        single_retrieval["throughput"]["items_encoded"]
    assert ranks[0]["summary"]["throughput"]["items_encoded"] == single["throughput"]["items_encoded"]
    # only rank 0 writes the report files (both ranks were given the same directory)
    assert (tmp_path / "mmeb" / "summary.json").is_file()
