"""MMEB readers: the exact MMEB-train / MMEB-eval column layouts, every source format, and
bad rows reported with file, row and field (or skipped and counted)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rematch.data.mmeb import iter_eval_examples, iter_train_examples, list_subsets, open_train_source
from rematch.data.mmeb_subsets import subset_info
from rematch.data.validation import BadRowReport, DataError


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _write_parquet(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture()
def mmeb_root(tmp_path, shape_images) -> Path:
    """A few rows in the exact layout of TIGER-Lab/MMEB-train and MMEB-eval (paths relative to ROOT)."""
    root = tmp_path / "mmeb"
    for relative, image in [("images/ImageNet_1K/Train/n01.jpg", 0), ("images/MSCOCO_t2i/Train/COCO_1.jpg", 1),
                            ("images/OK-VQA/Train/ok_1.jpg", 2), ("images/VisDial/Train/v1.jpg", 0),
                            ("images/VisDial/Train/v2.jpg", 1), ("eval/MSCOCO_i2t/q.jpg", 1),
                            ("eval/ImageNet-1K/q.jpg", 0)]:
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        shape_images[image].save(root / relative)
    # HF snapshot file naming (split "original"), parquet, with the empty negative columns MMEB ships.
    _write_parquet(root / "ImageNet_1K" / "original-00000-of-00001.parquet", [
        {"qry": "<|image_1|>\nRepresent the given image for classification\n",
         "qry_image_path": "images/ImageNet_1K/Train/n01.jpg", "pos_text": "red circle", "pos_image_path": "",
         "neg_text": "", "neg_image_path": ""}])
    _write_jsonl(root / "MSCOCO_t2i" / "original.jsonl", [
        {"qry": "Find me an everyday image that matches the given caption: a small blue star.\n",
         "qry_image_path": "", "pos_text": "<|image_1|>\nRepresent the given image.\n",
         "pos_image_path": "images/MSCOCO_t2i/Train/COCO_1.jpg", "neg_text": "", "neg_image_path": ""}])
    _write_jsonl(root / "OK-VQA" / "original.jsonl", [
        {"qry": "<|image_1|>\nRepresent the given image with the following question: What is shown?\n",
         "qry_image_path": "images/OK-VQA/Train/ok_1.jpg", "pos_text": "a triangle", "pos_image_path": "",
         "neg_text": "a circle", "neg_image_path": ""}])
    # VisDial: an image-only negative (empty neg_text), as in the published rows.
    _write_jsonl(root / "VisDial" / "original.jsonl", [
        {"qry": "Represent the given dialogue about an image, which is used for image retrieval: Q:is it red\nA:no\n",
         "qry_image_path": "", "pos_text": "<|image_1|>\nRepresent the given image\n",
         "pos_image_path": "images/VisDial/Train/v1.jpg", "neg_text": "",
         "neg_image_path": "images/VisDial/Train/v2.jpg"}])
    _write_parquet(root / "MSCOCO_i2t" / "test.parquet", [
        {"qry_text": "<|image_1|> Find an image caption describing the given everyday image.",
         "qry_img_path": "eval/MSCOCO_i2t/q.jpg", "tgt_text": ["a blue star", "a red circle", "a green square"],
         "tgt_img_path": ["", "", ""]}])
    _write_jsonl(root / "ImageNet-1K" / "test.jsonl", [
        {"qry_text": "<|image_1|> Represent the given image for classification",
         "qry_img_path": "eval/ImageNet-1K/q.jpg", "tgt_text": ["red circle", "blue star"],
         "tgt_img_path": ["", ""]}])
    return root


def test_mmeb_train_layout_reads_into_items_with_resolved_images(mmeb_root):
    assert list_subsets(mmeb_root, "original") == ["ImageNet_1K", "MSCOCO_t2i", "OK-VQA", "VisDial"]
    source = open_train_source(str(mmeb_root), split="original", seed=0)
    examples = {e.subset: e for e in source.take(40)}  # subsets are drawn at random: 40 draws see all 4
    assert set(examples) == {"ImageNet_1K", "MSCOCO_t2i", "OK-VQA", "VisDial"}
    cls = examples["ImageNet_1K"]
    assert cls.query.image == str(mmeb_root / "images/ImageNet_1K/Train/n01.jpg")
    assert cls.query.text.startswith("<|image_1|>\nRepresent") and cls.positive.text == "red circle"
    assert cls.positive.image is None and cls.negatives == ()  # MMEB's empty negative columns: no negative
    assert cls.ref.source.endswith("original-00000-of-00001.parquet") and cls.ref.row == 0
    t2i = examples["MSCOCO_t2i"]
    assert t2i.query.image is None and t2i.positive.image.endswith("COCO_1.jpg")
    assert [n.text for n in examples["OK-VQA"].negatives] == ["a circle"]
    (negative,) = examples["VisDial"].negatives
    assert negative.text is None and negative.image.endswith("v2.jpg")


def test_mmeb_eval_layout_reads_candidates_with_the_correct_one_first(mmeb_root):
    (example,) = iter_eval_examples(str(mmeb_root), "MSCOCO_i2t")
    assert example.query.image == str(mmeb_root / "eval/MSCOCO_i2t/q.jpg")
    assert [c.text for c in example.candidates] == ["a blue star", "a red circle", "a green square"]
    assert all(c.image is None for c in example.candidates)  # "" means no image
    (cls,) = iter_eval_examples(str(mmeb_root), "ImageNet-1K")
    assert cls.subset == "ImageNet-1K" and cls.ref.row == 0 and cls.candidates[0].text == "red circle"
    assert subset_info("ImageNet-1K").meta_task == subset_info("ImageNet_1K").meta_task == "classification"


def test_image_root_can_differ_from_the_data_root(mmeb_root, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (mmeb_root / "images").rename(elsewhere / "images")
    with pytest.raises(DataError, match="not found"):
        list(iter_train_examples(str(mmeb_root), "OK-VQA", split="original"))
    (example,) = iter_train_examples(str(mmeb_root), "OK-VQA", split="original", image_root=str(elsewhere))
    assert example.query.image == str(elsewhere / "images/OK-VQA/Train/ok_1.jpg")


def test_user_files_jsonl_csv_and_list_valued_negatives(tmp_path, shape_images):
    shape_images[0].save(tmp_path / "a.png")
    shape_images[1].save(tmp_path / "b.png")
    rows = [{"qry": "a red circle", "qry_image_path": "", "pos_text": "<|image_1|> an image", "pos_image_path": "a.png",
             "neg_text": ["<|image_1|> other", "a text negative"], "neg_image_path": ["b.png", ""],
             "comment": "extra columns are ignored"}]
    jsonl = _write_jsonl(tmp_path / "pairs.jsonl", rows)
    with open(tmp_path / "pairs_csv.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerow({**rows[0], "qry": "a red\ncircle",  # a quoted cell spanning two lines
                         "neg_text": json.dumps(rows[0]["neg_text"]), "neg_image_path": json.dumps(["b.png", ""])})
    for path, query in ((jsonl, "a red circle"), (tmp_path / "pairs_csv.csv", "a red\ncircle")):
        (example,) = iter_train_examples(str(path))
        assert example.subset == path.stem and example.query.text == query
        assert [(n.text, Path(n.image).name if n.image else None) for n in example.negatives] == [
            ("<|image_1|> other", "b.png"), ("a text negative", None)]
        assert example.positive.image == str(tmp_path / "a.png")


def test_a_saved_arrow_dataset_reads_through_the_hub_code_path(tmp_path, shape_images):
    datasets = pytest.importorskip("datasets")
    shape_images[0].save(tmp_path / "q.png")
    rows = {"qry": ["<|image_1|>\nRepresent the given image for classification\n"] * 3,
            "qry_image_path": ["q.png"] * 3, "pos_text": ["red circle", "blue star", "green square"],
            "pos_image_path": [""] * 3, "neg_text": [""] * 3, "neg_image_path": [""] * 3}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "Saved" / "train"))
    source = open_train_source(str(tmp_path), seed=0)
    assert len(source) == 3
    assert sorted(e.positive.text for e in source.take(3)) == ["blue star", "green square", "red circle"]


# ---------------------------------------------------------------------- bad rows


def _bad_train_rows(root: Path, image: Path) -> Path:
    good = {"qry": "a caption", "qry_image_path": "", "pos_text": "<|image_1|>\nRepresent the given image.\n",
            "pos_image_path": image.name}
    return _write_jsonl(root / "Bad" / "train.jsonl", [
        good,
        {**good, "pos_image_path": "missing.png"},  # 1 missing image
        {**good, "qry": "  "},  # 2 empty text
        {"qry": "no positive", "qry_image_path": ""},  # 3 schema
        {**good, "qry": "<|image_1|>\nFind a Wikipedia image that answers this question: why?\n"},  # 4 orphan
        {**good, "pos_text": "Represent the given image."},  # 5 image but no placeholder
        good,
    ])


@pytest.mark.parametrize("row, field, message", [
    (1, "pos_image_path", "image file not found: .*missing.png"),
    (2, "qry", "is empty"),
    (3, "pos_text", "missing column"),
    (4, "qry", "placeholder but 'qry_image_path' is empty"),
    (5, "pos_text", "no <\\|image_1\\|> placeholder"),
])
def test_each_bad_row_fails_fast_naming_file_row_and_field(tmp_path, shape_images, row, field, message):
    image = tmp_path / "root" / "img.png"
    image.parent.mkdir(parents=True)
    shape_images[0].save(image)
    path = _bad_train_rows(tmp_path / "root", image)
    rows = path.read_text().splitlines()
    kept = [rows[0], rows[row]]
    path.write_text("\n".join(kept) + "\n")
    with pytest.raises(DataError, match=rf"{path} row 1: field '{field}': .*{message}"):
        list(iter_train_examples(str(tmp_path / "root"), "Bad"))


def test_skip_bad_counts_every_skipped_row_by_reason(tmp_path, shape_images):
    root = tmp_path / "root"
    root.mkdir()
    shape_images[0].save(root / "img.png")
    _bad_train_rows(root, root / "img.png")
    report = BadRowReport()
    examples = list(iter_train_examples(str(root), "Bad", skip_bad=True, report=report))
    assert [e.ref.row for e in examples] == [0, 6]
    assert report.counts == {"missing image": 1, "unreadable image": 0, "empty text": 1, "schema": 1,
                             "placeholder mismatch": 2}
    assert report.total == 5 and len(examples) + report.total == 7  # nothing lost silently
    summary = report.summary()
    assert "5 bad row(s) skipped" in summary and "row 4: field 'qry'" in summary
    # The published WebQA quirk can be repaired instead of rejected; the repair is counted too.
    repaired = BadRowReport()
    rows = list(iter_train_examples(str(root), "Bad", skip_bad=True, report=repaired,
                                    strip_orphan_placeholders=True))
    assert [e.ref.row for e in rows] == [0, 4, 6]
    assert rows[1].query.text == "Find a Wikipedia image that answers this question: why?\n"
    assert repaired.repairs == {"orphan placeholder stripped": 1} and "repaired" in repaired.summary()


def test_eval_rows_with_misaligned_candidates_or_bad_json_are_reported(tmp_path):
    path = tmp_path / "root" / "Sub" / "test.jsonl"
    path.parent.mkdir(parents=True)
    good = {"qry_text": "a query", "qry_img_path": "", "tgt_text": ["x", "y"], "tgt_img_path": ["", ""]}
    path.write_text("\n".join([json.dumps(good), json.dumps({**good, "tgt_img_path": [""]}), "{not json",
                               json.dumps({**good, "tgt_text": ["x", ""]})]) + "\n")
    with pytest.raises(DataError, match=r"row 1: field 'tgt_img_path': has 1 entries but tgt_text has 2"):
        list(iter_eval_examples(str(tmp_path / "root"), "Sub"))
    report = BadRowReport()
    examples = list(iter_eval_examples(str(tmp_path / "root"), "Sub", skip_bad=True, report=report))
    assert len(examples) == 1 and report.counts["schema"] == 2 and report.counts["empty text"] == 1
    assert "line 3 is not valid JSON" in report.summary()
    assert "field 'tgt_text[1]'" in report.summary()


def test_a_whole_file_with_the_wrong_schema_fails_before_training(tmp_path):
    _write_parquet(tmp_path / "Sub" / "train.parquet", [{"qry_text": "q", "qry_img_path": "", "tgt_text": ["a"],
                                                          "tgt_img_path": [""]}])
    with pytest.raises(DataError, match=r"missing column\(s\) \['qry', .*MMEB-eval file"):
        open_train_source(str(tmp_path))


def test_line_numbers_of_bad_rows_are_counted_in_bounded_memory_and_one_pass(tmp_path):
    import tracemalloc

    from rematch.data.stores import JsonlStore

    path = tmp_path / "big.jsonl"
    good = json.dumps({"qry": "q" * 200, "qry_image_path": "", "pos_text": "p", "pos_image_path": ""}) + "\n"
    with open(path, "w") as handle:
        for block in range(4):
            handle.write(good * 5_000 + "\n" + "not json\n")  # a blank line, then a bad row
    store = JsonlStore(path)
    bad = [i for i, row in store.iter_rows() if isinstance(row, Exception)]
    assert len(bad) == 4
    tracemalloc.start()
    try:
        numbers = [store.line_number(i) for i in bad]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert numbers == [5_002 * (b + 1) for b in range(4)]
    assert peak < 4 << 20  # the file is ~4.3 MB: never read whole
    assert store.line_number(bad[0]) == 5_002  # counting again from an earlier row works too
