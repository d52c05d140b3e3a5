"""mteb runs a ReMatch model: its own offline mock tasks (text -> image, image -> text, image
classification, text retrieval), through the wrapper and through ``rematch eval mteb``, and on
a task whose data rematch reads too, mteb's scores equal ``rematch eval retrieval``'s.

Before issue 25 there was no mteb path: ``mteb.get_model(export_dir)`` found no
implementation, and a hand-wrapped export was text-only, so image tasks were refused.
"""

from __future__ import annotations

import json

import pytest

from rematch import ReMatchModel
from rematch.cli import main
from tests.support.imports import import_quietly
from tests.support.serving import cosines

mteb = import_quietly("mteb")
from mteb.mocks import (  # noqa: E402 - after the guarded import
    MockAny2AnyRetrievalI2TTask,
    MockAny2AnyRetrievalT2ITask,
    MockImageClassificationTask,
    MockRetrievalTask,
)
from mteb.types import PromptType  # noqa: E402

from rematch.integrations.mteb import load_encoder  # noqa: E402

MOCK_TASKS = ["MockAny2AnyRetrievalT2I", "MockAny2AnyRetrievalI2T", "MockImageClassification", "MockRetrievalTask"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("mteb") / "shapes-model"
    ReMatchModel.tiny(num_tokens=4, seed=7, max_pixels=56 * 56).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def encoder(model_dir):
    return load_encoder(str(model_dir), device="cpu")


def test_the_wrapper_runs_mtebs_mock_image_and_text_tasks_offline(encoder):
    tasks = [MockAny2AnyRetrievalT2ITask(), MockAny2AnyRetrievalI2TTask(), MockImageClassificationTask(),
             MockRetrievalTask()]
    result = mteb.evaluate(encoder, tasks, cache=None, show_progress_bar=False, co2_tracker=False)
    scores = {task_result.task_name: task_result.get_score() for task_result in result.task_results}
    assert sorted(scores) == sorted(MOCK_TASKS)
    assert all(0.0 <= score <= 1.0 for score in scores.values()), scores


def test_model_meta_declares_image_and_text_cosine_and_the_fingerprint(encoder, model_dir):
    meta = encoder.mteb_model_meta
    assert meta.modalities == ["image", "text"] and meta.similarity_fn_name.value == "cosine"
    assert meta.name == "rematch/shapes-model" and str(model_dir) not in meta.name
    assert meta.revision == encoder.model.fingerprint() and meta.embed_dim == encoder.model.hidden_size
    assert meta.use_instructions and meta.model_type == ["dense"]


def test_roles_and_instructions(encoder):
    """mteb's document side is ReMatch's document role with its own document instruction; the query side
    gets the task's instruction from mteb's metadata, unless an item brings its own."""
    model = encoder.model
    metadata = MockAny2AnyRetrievalT2ITask().metadata
    instruction = encoder.task_instruction(metadata, PromptType.query)
    assert instruction and instruction == encoder.get_instruction(metadata, PromptType.query)
    assert encoder.task_instruction(metadata, PromptType.document) is None
    task = MockAny2AnyRetrievalT2ITask()
    task.load_data()
    images = list(task.dataset["default"]["test"]["corpus"]["image"])
    batches = [{"text": ["a red circle", "two squares"], "query": ["a red circle", "two squares"],
                "instruction": ["", "Count the squares."]}]
    queries = encoder.encode(batches, task_metadata=metadata, hf_split="test", hf_subset="default",
                             prompt_type=PromptType.query)
    expected = model.encode([{"text": "a red circle", "instruction": instruction},
                             {"text": "two squares", "instruction": "Count the squares."}], role="query")
    assert cosines(queries, expected).min() >= 0.9999
    documents = encoder.encode([{"image": images}], task_metadata=metadata, hf_split="test", hf_subset="default",
                               prompt_type=PromptType.document)
    assert cosines(documents, model.encode([{"image": image} for image in images], role="document")).min() >= 0.9999
    with pytest.raises(ValueError, match="not audio"):
        encoder.encode([{"audio": [None]}], task_metadata=metadata, hf_split="test", hf_subset="default")


def _write_retrieval_files(task, root):
    """The mock task's queries, corpus and qrels in the files ``rematch eval retrieval`` reads."""
    task.load_data()
    split = task.dataset["default"]["test"]
    root.mkdir()

    def rows(dataset, name):
        lines = []
        for row in dataset:
            record = {"id": row["id"]}
            if row.get("image") is not None:
                row["image"].save(root / f"{row['id']}.png")
                record["image"] = f"{row['id']}.png"
            if row.get("text"):
                record["text"] = row["text"]
            lines.append(json.dumps(record))
        (root / name).write_text("\n".join(lines) + "\n")

    rows(split["queries"], "queries.jsonl")
    rows(split["corpus"], "corpus.jsonl")
    (root / "qrels.tsv").write_text("".join(f"{query}\t{doc}\t{grade}\n" for query, docs in
                                            split["relevant_docs"].items() for doc, grade in docs.items()))
    return root


def test_rematch_eval_mteb_writes_results_and_equals_rematch_eval_retrieval(model_dir, encoder, tmp_path, capsys):
    out = tmp_path / "mteb-out"
    common = ["--model", str(model_dir), "--allow-untrained", "--device", "cpu"]
    assert main(["eval", "mteb", "--tasks", *MOCK_TASKS, "--out", str(out), *common]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(summary["tasks"]) == sorted(MOCK_TASKS) and "not_run" not in summary
    assert summary["model"] == "rematch/shapes-model" and summary["model_fingerprint"] == encoder.model.fingerprint()
    assert "| MockAny2AnyRetrievalT2I | Any2AnyRetrieval | ndcg_at_10 |" in (out / "summary.md").read_text()
    assert "MockImageClassification" in printed
    results = out / "results" / "rematch__shapes-model" / encoder.model.fingerprint()
    assert (results / "MockAny2AnyRetrievalT2I.json").is_file()

    for task in (MockAny2AnyRetrievalT2ITask(), MockAny2AnyRetrievalI2TTask()):
        name = task.metadata.name
        instruction = encoder.task_instruction(task.metadata, PromptType.query)
        files = _write_retrieval_files(task, tmp_path / name)
        assert main(["eval", "retrieval", "--queries", str(files / "queries.jsonl"), "--corpus",
                     str(files / "corpus.jsonl"), "--qrels", str(files / "qrels.tsv"), "--query-instruction",
                     instruction, "--cache-dir", str(tmp_path / "cache"), "--json", *common]) == 0
        ours = json.loads(capsys.readouterr().out)["metrics"]
        theirs = json.loads((results / f"{name}.json").read_text())["scores"]["test"][0]
        assert ours["ndcg@10"] == pytest.approx(theirs["ndcg_at_10"], abs=1e-4), name
        assert ours["mrr"] == pytest.approx(theirs["mrr_at_10"], abs=1e-4), name
        assert ours["hit@1"] == pytest.approx(theirs["recall_at_1"], abs=1e-4), name
        assert summary["tasks"][name]["main_score"] == pytest.approx(ours["ndcg@10"], abs=1e-4)


def test_eval_mteb_reuses_its_output_and_refuses_other_folders(model_dir, tmp_path, capsys, cli_error):
    out = tmp_path / "out"
    common = ["--model", str(model_dir), "--allow-untrained", "--device", "cpu"]
    assert main(["eval", "mteb", "--tasks", "MockRetrievalTask", "--out", str(out), *common]) == 0
    first = (out / "summary.json").read_text()
    assert main(["eval", "mteb", "--tasks", "MockRetrievalTask", "--out", str(out), *common]) == 0  # reused
    assert json.loads((out / "summary.json").read_text()) == json.loads(first)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    assert "refusing" in cli_error(["eval", "mteb", "--tasks", "MockRetrievalTask", "--out", tmp_path / "mine",
                                    *common])
    assert "mteb has no task 'NoSuchTask'" in cli_error(["eval", "mteb", "--tasks", "NoSuchTask", "--out",
                                                         tmp_path / "new", *common])
    assert not (tmp_path / "new").exists()
