"""Every sentence-transformers idiom gives the role it names, in a process where rematch cannot be imported.

Before issue 25, ``encode(x, prompt_name="document")`` returned the *query* vector (the
export's prompts were empty, so the module saw no role), silently: cosine 0.89 to
``encode_document``. Here each idiom's vectors are compared with ``ReMatchModel.encode``
of the role it names (cosine >= 0.9999), computed in a child process whose import system
refuses ``rematch``, so the export is shown to stand on its own.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap

import numpy as np
import pytest
import torch

from rematch import ReMatchModel
from rematch.atomic import ReplaceRefusedError
from rematch.cli import main
from rematch.export import export_model
from tests.support.imports import import_quietly
from tests.support.processes import NO_REMATCH, run_with_deadline
from tests.support.serving import cosines, shape_image

import_quietly("sentence_transformers")
MIN_COSINE = 0.9999

#: Runs in the child: rematch is unimportable, then each idiom's vectors are saved.
CHILD = NO_REMATCH + textwrap.dedent('''
    import json
    import numpy as np

    from PIL import Image
    from sentence_transformers import SentenceTransformer

    export, image_path, out = sys.argv[1:4]
    items = ["a red circle", {"image": image_path},
             {"text": "What colour is the circle?", "image": image_path},
             Image.open(image_path)]
    model = SentenceTransformer(export, trust_remote_code=True, device="cpu")
    idioms = {
        "encode_query": model.encode_query(items),
        "encode_document": model.encode_document(items),
        "encode": model.encode(items),
        "prompt_name=query": model.encode(items, prompt_name="query"),
        "prompt_name=document": model.encode(items, prompt_name="document"),
        "task=query": model.encode(items, task="query"),
        "task=document": model.encode(items, task="document"),
        "encode_document(prompt=...)": model.encode_document(items, prompt="Represent the picture."),
    }
    np.savez(out, **idioms)
    print(json.dumps({"prompts": model.prompts, "default_prompt_name": model.default_prompt_name}))
''')

#: idiom -> (role, instruction) rematch must give the same vectors for.
EXPECTED = {
    "encode_query": ("query", None),
    "encode_document": ("document", None),
    "encode": ("query", None),
    "prompt_name=query": ("query", None),
    "prompt_name=document": ("document", None),
    "task=query": ("query", None),
    "task=document": ("document", None),
    "encode_document(prompt=...)": ("document", "Represent the picture."),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("st")
    model = ReMatchModel.tiny(num_tokens=4, seed=5, min_pixels=28 * 28, max_pixels=56 * 56)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():  # trained tokens are not vocabulary rows
        for tokens in (model.query_tokens, model.document_tokens):
            tokens.add_(0.05 * torch.randn(tokens.shape, generator=generator))
    out = export_model(model, root / "export", "sentence-transformers", allow_untrained=True)
    shape_image("red", "circle").save(root / "circle.png")
    return model, out, root / "circle.png"


def test_every_idiom_gives_its_role_without_rematch(exported, tmp_path):
    model, out, image = exported
    vectors = tmp_path / "vectors.npz"
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = run_with_deadline([sys.executable, "-c", CHILD, str(out), str(image), str(vectors)],
                               env=dict(environment, OMP_NUM_THREADS="1"), cwd=tmp_path, text=True)
    assert result.returncode == 0, result.stderr[-3000:]

    from PIL import Image

    items = ["a red circle", {"image": str(image)}, {"text": "What colour is the circle?", "image": str(image)},
             {"image": Image.open(image)}]
    with np.load(vectors) as saved:
        for idiom, (role, instruction) in EXPECTED.items():
            given = [dict(item, instruction=instruction) if instruction else item for item in
                     ({"text": item} if isinstance(item, str) else item for item in items)]
            ours = model.encode(given, role=role)
            assert cosines(saved[idiom], ours).min() >= MIN_COSINE, idiom
        other = model.encode(items, role="query")
        assert cosines(saved["prompt_name=document"], other).min() < 0.999  # the roles really differ here
    config = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(config["prompts"]) == {"query", "document"}
    assert config["default_prompt_name"] is None  # a plain encode is a query anyway; a default makes ST warn


def test_the_export_declares_image_and_text_as_mteb_reads_it(exported):
    _, out, _ = exported
    config = json.loads((out / "sentence_bert_config.json").read_text())
    assert {"text", "image"} <= set(config["modality_config"])
    mteb_meta = import_quietly("mteb.models.model_meta")
    # what mteb.get_model_meta sets for a hub repository with this file (it reads no other modality source)
    assert mteb_meta.ModelMeta._detect_modalities_from_sbert_config(config) == ["image", "text"]


def test_an_export_of_the_other_format_is_not_replaced_without_overwrite(tmp_path, capsys):
    ReMatchModel.tiny(num_tokens=2).save_pretrained(tmp_path / "model")
    out = tmp_path / "exported"
    assert main(["export", str(tmp_path / "model"), str(out), "--format", "sentence-transformers",
                 "--allow-untrained"]) == 0
    capsys.readouterr()
    before = sorted(path.name for path in out.iterdir())
    assert "modules.json" in before
    assert main(["export", str(tmp_path / "model"), str(out), "--allow-untrained"]) == 1  # no --format
    error = capsys.readouterr().err
    assert "holds a sentence-transformers export" in error and "--overwrite" in error
    assert sorted(path.name for path in out.iterdir()) == before  # untouched
    assert main(["export", str(tmp_path / "model"), str(out), "--format", "sentence-transformers",
                 "--allow-untrained"]) == 0  # the same format is an update
    assert main(["export", str(tmp_path / "model"), str(out), "--allow-untrained", "--overwrite"]) == 0
    assert not (out / "modules.json").exists()
    with pytest.raises(ReplaceRefusedError, match="holds a transformers export"):
        export_model(ReMatchModel.tiny(num_tokens=2), out, "sentence-transformers", allow_untrained=True)
