"""``rematch data synth`` and ``rematch data check`` through the real CLI entry point."""

from __future__ import annotations

import json

from rematch.cli import main
from rematch.data.mmeb import iter_eval_examples, list_subsets, open_train_source


def _synth(out, fmt="jsonl"):
    return main(["data", "synth", "--out", str(out), "--train-rows", "30", "--eval-queries", "10", "--seed", "3",
                 "--candidates", "20", "--format", fmt, "--image-size", "56"])


def test_synth_writes_a_dataset_the_readers_and_check_accept(tmp_path, capsys):
    for fmt in ("jsonl", "parquet"):
        out = tmp_path / fmt
        assert _synth(out, fmt) == 0
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["subsets"]["ShapesT2I"] == {"meta_task": "retrieval", "split": "IND", "train": 6, "test": 10}
        assert list_subsets(out, "train") == list_subsets(out, "test") == [
            "ShapesCLS", "ShapesGround", "ShapesI2T", "ShapesT2I", "ShapesVQA"]
        assert (out / "ShapesT2I" / f"test.{fmt}").is_file()
        queries = list(iter_eval_examples(str(out), "ShapesT2I"))
        assert len(queries) == 10 and all(len(q.candidates) == 20 for q in queries)
        assert len(open_train_source(str(out))) == 30
        assert main(["data", "check", str(out)]) == 0
        printed = capsys.readouterr().out
        assert "ShapesGround  test   eval      10         0" in printed and "all good" in printed


def test_check_reports_missing_and_corrupt_images_and_schema_with_row_ids(tmp_path, capsys):
    out = tmp_path / "world"
    assert _synth(out) == 0
    capsys.readouterr()
    t2i = out / "ShapesT2I" / "train.jsonl"
    rows = [json.loads(line) for line in t2i.read_text().splitlines()]
    (out / rows[1]["pos_image_path"]).unlink()
    (out / rows[3]["neg_image_path"]).write_bytes(b"not an image")
    rows[4]["qry"] = ""
    del rows[5]["pos_text"]
    t2i.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert main(["data", "check", str(out), "--split", "train"]) == 1
    printed = capsys.readouterr().out
    header, *table = printed.split("\n\n")[0].splitlines()
    assert header.split() == ["subset", "split", "schema", "rows", "bad", "rows", "missing", "img", "unreadable",
                              "img", "empty", "text", "schema", "placeholder"]
    (t2i_line,) = [line for line in table if line.startswith("ShapesT2I")]
    assert t2i_line.split() == ["ShapesT2I", "train", "train", "6", "4", "1", "1", "1", "1", "0"]
    assert all(line.split()[4] == "0" for line in table if not line.startswith("ShapesT2I"))
    assert f"{t2i} row 1: field 'pos_image_path': image file not found" in printed
    assert f"{t2i} row 3: field 'neg_image_path': cannot read image" in printed
    assert f"{t2i} row 4: field 'qry'" in printed and f"{t2i} row 5: field 'pos_text': missing column" in printed
    assert "4 bad row(s) in 30 rows" in printed


def test_an_unreadable_file_is_reported_and_the_other_subsets_are_still_checked(tmp_path, capsys):
    out = tmp_path / "world"
    assert _synth(out, "parquet") == 0
    (out / "ShapesCLS" / "train.parquet").write_bytes(b"PAR1 this is not parquet at all PAR1")
    (out / "ShapesVQA" / "train.parquet").unlink()
    (out / "ShapesVQA" / "train.jsonl").write_bytes(b'{"qry": "\xff\xfe broken utf-8"}\n')
    capsys.readouterr()
    assert main(["data", "check", str(out), "--split", "train"]) == 1
    printed = capsys.readouterr().out
    table = printed.split("\n\n")[0].splitlines()[1:]
    assert {line.split()[0] for line in table} == {"ShapesCLS", "ShapesGround", "ShapesI2T", "ShapesT2I", "ShapesVQA"}
    assert f"ShapesCLS/train: UNREADABLE: cannot read {out / 'ShapesCLS' / 'train.parquet'}" in printed
    assert f"{out / 'ShapesVQA' / 'train.jsonl'} row 0" in printed  # a broken line is a bad row, named
    assert "1 bad row(s)" in printed and "1 file(s) could not be read" in printed
