"""``rematch export``: plain transformers and sentence-transformers reproduce ReMatchModel.encode.

The plain-transformers side runs ``rematch_embedding.py`` -- the very file the export copies
and the docs show -- on the exported directory; it imports only torch and transformers.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rematch import ReMatchModel
from rematch.cli import main
from rematch.export import export_model
from rematch.export.fold import PROJECTOR_NAME, SETTINGS_NAME, role_token_names
from tests.support import REPO

STANDALONE = REPO / "src" / "rematch" / "export" / "standalone"
MIN_COSINE = 0.9999


def load_standalone(name: str = "rematch_embedding"):
    """The standalone file as its own module (not through the rematch package)."""
    spec = importlib.util.spec_from_file_location(f"standalone_{name}", STANDALONE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def items(shape_images):
    odd_size = shape_images[1].resize((100, 70))  # resized by the image processor, not already 28-aligned
    return [
        {"text": "a red circle"},
        {"image": shape_images[0], "text": "What colour is the circle?"},
        {"text": "a small blue star left of a large green square", "instruction": "Find the picture."},
        {"image": odd_size},
        {"image": shape_images[2], "text": "<|image_1|> Identify the object in the image."},
    ]


@pytest.fixture(scope="module")
def sentence_transformers_module():
    """sentence-transformers, imported with the environment kept as it was (its import sets KMP_* variables)."""
    before = dict(os.environ)
    try:
        module = pytest.importorskip("sentence_transformers")
    finally:
        for key in set(os.environ) - set(before):
            del os.environ[key]
        os.environ.update(before)
    return module


def assert_same_vectors(ours: np.ndarray, theirs: np.ndarray) -> None:
    assert ours.shape == theirs.shape
    cosines = (ours * theirs).sum(axis=1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1))
    assert np.isfinite(cosines).all() and cosines.min() >= MIN_COSINE, cosines


def randomise_heads(model: ReMatchModel, seed: int) -> ReMatchModel:
    """Move the learnable tokens away from their init (a trained model's are not vocabulary rows)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tokens in (model.query_tokens, model.document_tokens):
            tokens.add_(0.05 * torch.randn(tokens.shape, generator=generator))
    return model


@pytest.mark.parametrize("family,k", [("qwen2_vl", 4), ("qwen2_5_vl", 32), ("qwen3_vl", 4)])
def test_plain_transformers_forward_equals_encode(tmp_path, items, family, k):
    # K=32 needs 64 added tokens, more than the tiny table's spare rows: the export grows the vocabulary
    model = randomise_heads(ReMatchModel.tiny(backbone=family, num_tokens=k, min_pixels=28 * 28, max_pixels=56 * 56), k)
    rows = model.backbone.get_input_embeddings().weight.shape[0]
    out = export_model(model, tmp_path / "export", allow_untrained=True)

    standalone = load_standalone()
    embedder = standalone.ExportedEmbedder(out)
    assert type(embedder.model).__name__ == {"qwen2_vl": "Qwen2VLForConditionalGeneration",
                                             "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
                                             "qwen3_vl": "Qwen3VLForConditionalGeneration"}[family]
    for role in ("query", "document"):
        assert_same_vectors(model.encode(items, role=role), embedder.embed(items, role=role).numpy())
    # queries and documents really use different tokens (and the document instruction)
    assert not np.allclose(embedder.embed(items[:1], "query").numpy(), embedder.embed(items[:1], "document").numpy())

    names = role_token_names(k)
    tokenizer = embedder.tokenizer
    ids = tokenizer.convert_tokens_to_ids(names["query"] + names["document"])
    added = tokenizer.added_tokens_decoder
    assert all(added[i].special and added[i].content == name for i, name in zip(ids, names["query"] + names["document"]))
    table = embedder.model.get_input_embeddings().weight
    torch.testing.assert_close(table[ids], torch.cat([model.query_tokens, model.document_tokens]).detach())
    config = json.loads((out / "config.json").read_text())
    vocab = config.get("text_config", config).get("vocab_size", config.get("vocab_size"))
    assert vocab == table.shape[0] and (vocab > rows) == (max(ids) >= rows)
    assert not (out / "rematch_config.json").exists()  # an ordinary checkpoint, not a ReMatch directory
    assert (out / "rematch_embedding.py").read_bytes() == (STANDALONE / "rematch_embedding.py").read_bytes()


def test_lora_is_merged_and_the_projector_is_saved(tmp_path, items):
    model = ReMatchModel.tiny(num_tokens=4, min_pixels=28 * 28, max_pixels=56 * 56)
    model.enable_lora(r=4, alpha=8)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # LoRA B starts at zero: make the adapters change the output
        for name, parameter in model.backbone.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
    model.projector.observe(torch.nn.functional.normalize(  # as a training step sets the projector's centre
        torch.randn(8, model.hidden_size, generator=generator) + 2.0, dim=-1))
    expected = {role: model.encode(items[:3], role=role) for role in ("query", "document")}
    out = export_model(model, tmp_path / "export", allow_untrained=True)
    assert not any("lora" in name for name in load_file(str(out / "model.safetensors")))

    standalone = load_standalone()
    embedder = standalone.ExportedEmbedder(out)
    for role, vectors in expected.items():
        assert_same_vectors(vectors, embedder.embed(items[:3], role=role).numpy())
    projector = standalone.load_projector(out)
    embedding = torch.nn.functional.normalize(torch.randn(3, model.hidden_size, generator=generator), dim=-1)
    torch.testing.assert_close(projector(embedding), model.projector(embedding))
    assert set(load_file(str(out / PROJECTOR_NAME))) == set(model.projector.state_dict())


def test_settings_record_how_rematch_encoded(tmp_path):
    model = ReMatchModel.tiny(num_tokens=2, max_text_tokens=7, system_prompt="Be brief.", document_instructions=False)
    out = export_model(model, tmp_path / "export", allow_untrained=True)
    settings = json.loads((out / SETTINGS_NAME).read_text())
    assert settings["num_tokens"] == 2 and settings["pooling"] == "mean"
    assert settings["max_text_tokens"] == 7 and settings["system_prompt"] == "Be brief."
    assert settings["document_instruction"] is None  # this model gives documents no default instruction
    assert settings["role_tokens"] == role_token_names(2)
    long_text = [{"text": "one two three four five six seven eight nine ten eleven twelve"}]
    embedder = load_standalone().ExportedEmbedder(out)
    assert_same_vectors(model.encode(long_text, role="document"), embedder.embed(long_text, "document").numpy())


def test_last_token_pooling_without_learnable_tokens(tmp_path, items):
    model = ReMatchModel.tiny(num_tokens=0, min_pixels=28 * 28, max_pixels=56 * 56)  # the VLM2Vec-style baseline
    out = export_model(model, tmp_path / "export", allow_untrained=True)
    embedder = load_standalone().ExportedEmbedder(out)
    assert embedder.settings["pooling"] == "last" and embedder.settings["role_tokens"] == {"query": [],
                                                                                          "document": []}
    for role in ("query", "document"):
        assert_same_vectors(model.encode(items[:2], role=role), embedder.embed(items[:2], role=role).numpy())


def test_sentence_transformers_directory_equals_encode(tmp_path, items, sentence_transformers_module):
    sentence_transformers = sentence_transformers_module
    model = randomise_heads(ReMatchModel.tiny(num_tokens=4, min_pixels=28 * 28, max_pixels=56 * 56), 3)
    out = export_model(model, tmp_path / "st-export", "sentence-transformers", allow_untrained=True)
    # self-contained: the module files never import rematch
    for name in ("rematch_sentence_transformers.py", "rematch_embedding.py"):
        assert not re.search(r"^\s*(from|import)\s+rematch\b", (out / name).read_text(), re.MULTILINE), name

    st_model = sentence_transformers.SentenceTransformer(str(out), trust_remote_code=True, device="cpu")
    assert_same_vectors(model.encode(items, role="query"), st_model.encode_query(items))
    assert_same_vectors(model.encode(items, role="document"), st_model.encode_document(items))
    assert_same_vectors(model.encode(["a red circle"], role="query"), st_model.encode(["a red circle"]))
    # a prompt is the instruction of items without one (ReMatch puts it in the system turn)
    prompted = st_model.encode_query(["a red circle"], prompt="Find the picture.")
    assert_same_vectors(model.encode([{"text": "a red circle", "instruction": "Find the picture."}]), prompted)
    assert st_model.get_sentence_embedding_dimension() == model.hidden_size
    with pytest.raises(ValueError, match="input 1: unknown field"):
        st_model.encode_query(["fine", {"text": "x", "colour": "red"}])

    st_model.save(str(tmp_path / "resaved"))  # the module saves itself as a loadable directory again
    again = sentence_transformers.SentenceTransformer(str(tmp_path / "resaved"), trust_remote_code=True, device="cpu")
    assert_same_vectors(st_model.encode_document(items[:2]), again.encode_document(items[:2]))


def test_export_command(tmp_path, capsys):
    ReMatchModel.tiny(num_tokens=2).save_pretrained(tmp_path / "model")
    out = tmp_path / "exported"
    assert main(["export", str(tmp_path / "model"), str(out)]) == 1  # untrained heads: refused
    assert "untrained" in capsys.readouterr().err and not out.exists()
    assert main(["export", str(tmp_path / "model"), str(out), "--allow-untrained"]) == 0
    assert (out / SETTINGS_NAME).is_file() and (out / "README.md").read_text().startswith("---\nlibrary_name: "
                                                                                         "transformers")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("my own file")
    assert main(["export", str(tmp_path / "model"), str(tmp_path / "mine"), "--allow-untrained"]) == 1
    assert "refusing" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "my own file"
    assert main(["export", str(tmp_path / "model"), str(out), "--allow-untrained"]) == 0  # an export is replaced


def test_exporting_an_export_is_refused_clearly(tmp_path):
    model = ReMatchModel.tiny(num_tokens=2)
    out = export_model(model, tmp_path / "export", allow_untrained=True)
    from transformers import AutoTokenizer

    model.adapter.processor.tokenizer = AutoTokenizer.from_pretrained(out)  # a vocabulary that already has them
    with pytest.raises(ValueError, match="already has token"):
        export_model(model, tmp_path / "again", allow_untrained=True)
    assert not (tmp_path / "again").exists()


def test_the_lines_in_the_docs_are_the_lines_the_tests_run():
    docs = (REPO / "docs" / "export.md").read_text()
    marker = "<!-- verbatim from rematch_embedding.py"
    assert marker in docs
    block = docs.split(marker, 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    source = (STANDALONE / "rematch_embedding.py").read_text()
    source_lines = {line.strip() for line in source.splitlines()}
    shown = [line.strip() for line in block.splitlines() if line.strip()]
    assert len(shown) > 20 and all(line in source_lines for line in shown), \
        [line for line in shown if line not in source_lines]
