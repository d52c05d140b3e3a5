"""Model cards: the README.md a saved, pushed or exported model directory carries.

A card is what a person reads on the hub before trusting a model, and what the hub reads
to list it (the YAML front matter: library, base model, pipeline tag, tags, datasets,
license). Everything on it comes from the model itself (its rematch_config.json or the
in-memory config), the training run's config when the model directory has it
(``rematch_training_config.yaml``, copied there from the run directory when training saves the
model), and an evaluation table (:class:`EvalTable`) when one is given -- never from guesses:
a field that is not known is left out.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

import yaml

from rematch.hub.resolve import HUB_ID, is_local_spec

CARD_NAME = "README.md"
#: The run's config.yaml, as copied into the model directory by save_pretrained.
TRAINING_CONFIG_NAME = "rematch_training_config.yaml"
#: A training run directory's record and config (``rematch.training.run_directory`` writes them;
#: the card reads them when a model is saved into ``RUN/model``, so the names live here, below both).
RUN_RECORD_NAME, RUN_CONFIG_NAME = "run.json", "config.yaml"
PIPELINE_TAG = "feature-extraction"
FORMATS = ("rematch", "transformers", "sentence-transformers")
#: Recipe settings worth a row of their own on the card (the full YAML follows them).
RECIPE_KEYS = (
    ("model", "backbone"), ("model", "num_tokens"), ("model", "pooling"), ("loss", "temperature"),
    ("loss", "contrastive"), ("loss", "orthogonality"), ("loss", "matching"), ("loss", "hard_negatives"),
    ("lora", "enabled"), ("lora", "r"), ("lora", "alpha"), ("train", "steps"), ("train", "batch_size"),
    ("train", "lr"), ("train", "scheduler"), ("train", "grad_cache_chunk"), ("data", "source"),
    ("data", "subsets"),
)


class EvalSummaryError(ValueError):
    """An evaluation summary given for a card is unusable (unreadable, or of another model)."""


@dataclasses.dataclass(frozen=True)
class EvalTable:
    """The evaluation table a card shows, as data.

    Why data and not a path: the card sits below evaluation in the layers, so it does not
    read evaluation outputs itself; ``rematch.evaluation.report.read_eval_table`` builds
    this from an ``rematch eval mmeb`` directory (rows in the report's group order).
    """

    primary_metric: str
    groups: tuple[tuple[str, int, float], ...]   # (group, number of subsets, score in [0, 1])
    subsets: tuple[tuple[str, float], ...]       # (subset, score in [0, 1])
    notes: tuple[str, ...] = ()                  # sentences printed under the heading
    model_fingerprint: str | None = None         # the model that was scored, if recorded
    source: str = "evaluation summary"           # where the table came from (for messages)

    def check_model(self, fingerprint: str | None) -> "EvalTable":
        """Refuse another model's numbers: a card never shows scores of a different model."""
        if fingerprint is not None and self.model_fingerprint is not None and self.model_fingerprint != fingerprint:
            raise EvalSummaryError(f"{self.source} scored model {self.model_fingerprint}, but this model's "
                                   f"fingerprint is {fingerprint}: those are another model's numbers; evaluate "
                                   "this model (rematch eval mmeb) and pass that output directory")
        return self


def hub_reference(spec: str | None) -> str | None:
    """``spec`` if it names a hub repository (``org/name``, no local path), else None."""
    if not spec or spec == "tiny":
        return None
    repo_id = spec.split("@", 1)[0]
    return repo_id if HUB_ID.fullmatch(repo_id) and not is_local_spec(spec) else None


def read_training_config(model_dir: str | os.PathLike | None) -> dict[str, Any] | None:
    """The run config saved in a model directory, or None; a damaged file is an error naming it."""
    if model_dir is None:
        return None
    path = Path(model_dir) / TRAINING_CONFIG_NAME
    if not path.is_file():
        return None
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid YAML ({error})") from error
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a mapping of config sections, got {type(config).__name__}")
    return config


def render_card(model_config: Mapping[str, Any], *, model_type: str, model_id: str | None = None,
                output_format: str = "rematch", training_config: Mapping[str, Any] | None = None,
                eval_table: EvalTable | None = None, license: str | None = None,
                location: str | None = None, trained: bool | None = None) -> str:
    """The README.md text of a model directory (``output_format``: how the directory is loaded).

    The usage examples load ``model_id`` (a hub repository), else ``location`` (a local path).
    ``trained``: whether the ReMatch heads were trained (None: not known); the summary says
    what the model was fine-tuned from, or that its heads are untrained.
    """
    if output_format not in FORMATS:
        raise ValueError(f"output_format must be one of {FORMATS}, got {output_format!r}")
    reference = model_id or location or "path/to/this/model"
    sections = [_front_matter(model_config, model_type, output_format, training_config, license),
                f"# {model_id.split('/')[-1] if model_id else 'ReMatch embedding model'}", "",
                _summary(model_config, model_type, output_format, trained), "",
                _usage(reference, output_format, model_config), ""]
    if eval_table is not None:
        sections += [_eval_table(eval_table), ""]
    if training_config is not None:
        sections += [_recipe(training_config), ""]
    sections += ["## About ReMatch", "",
                 "ReMatch (arXiv 2511.19278) fine-tunes a multimodal LLM into a single-vector retriever: K learnable "
                 "tokens end every input and the mean of their final states is the embedding (trained with InfoNCE, "
                 "an orthogonality penalty on the K states, and a generative Yes/No matching loss). This card was "
                 "written by the `rematch` package.", ""]
    return "\n".join(sections)


def model_card_for(model, *, model_id: str | None = None, output_format: str = "rematch",
                   model_dir: str | os.PathLike | None = None, eval_table: EvalTable | None = None,
                   license: str | None = None, location: str | None = None) -> str:
    """:func:`render_card` for an in-memory ReMatchModel (the recipe from ``model_dir`` when it has one)."""
    if eval_table is not None:
        eval_table.check_model(model.fingerprint())
    return render_card(dataclasses.asdict(model.config), model_type=model._causal_lm().config.model_type,
                       model_id=model_id, output_format=output_format, training_config=read_training_config(model_dir),
                       eval_table=eval_table, license=license, location=location, trained=not model.is_untrained())


# ---------------------------------------------------------------------------- sections


def _front_matter(config: Mapping[str, Any], model_type: str, output_format: str,
                  training_config: Mapping[str, Any] | None, license: str | None) -> str:
    library = {"rematch": "rematch", "transformers": "transformers",
               "sentence-transformers": "sentence-transformers"}[output_format]
    tags = ["rematch", "multimodal-embedding", "retrieval", model_type.replace("_", "-"), "image-text"]
    if output_format == "sentence-transformers":
        tags.append("sentence-similarity")
    meta: dict[str, Any] = {"library_name": library}
    base = hub_reference(config.get("backbone"))
    if base:
        meta["base_model"] = base
    meta["pipeline_tag"] = PIPELINE_TAG
    meta["tags"] = tags
    datasets = _datasets(training_config)
    if datasets:
        meta["datasets"] = datasets
    if license:
        meta["license"] = license
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def _datasets(training_config: Mapping[str, Any] | None) -> list[str]:
    data = (training_config or {}).get("data") or {}
    source = data.get("source") if isinstance(data, Mapping) else None
    reference = hub_reference(source) if isinstance(source, str) else None
    return [reference] if reference else []


def _summary(config: Mapping[str, Any], model_type: str, output_format: str, trained: bool | None = None) -> str:
    k = config.get("num_tokens")
    fusion = f"the mean of the final states of {k} learnable tokens per role" if k else "the last token's final state"
    lines = [f"A multimodal embedding model (text, images, or both) {_origin(config, model_type, trained)}: one "
             f"vector per input, {fusion}, L2-normalised, compared by cosine similarity. Queries and documents have "
             "their own learnable tokens; documents without an instruction get the default document instruction."]
    if output_format == "transformers":
        lines.append("\nThis is a plain Qwen-VL checkpoint: the learnable tokens are added special tokens of its "
                     "vocabulary (`<|emb_q_*|>` for queries, `<|emb_d_*|>` for documents) and LoRA is merged, so "
                     "`transformers` alone loads it; `rematch_embedding.py` holds the few lines that turn its "
                     "states into the embedding.")
    elif output_format == "sentence-transformers":
        lines.append("\nA sentence-transformers directory: a plain Qwen-VL checkpoint with the learnable tokens in "
                     "its vocabulary, plus a custom module (`rematch_sentence_transformers.py`, which needs "
                     "`trust_remote_code=True`).")
    return "\n".join(lines)


def _origin(config: Mapping[str, Any], model_type: str, trained: bool | None) -> str:
    """What the model was fine-tuned from (its backbone), in words: a hub id, the shipped ``tiny-pretrained``,
    or the random ``tiny`` test backbone; "fine-tuned" only when the heads were trained."""
    backbone = str(config.get("backbone") or "")
    family = str(config.get("tiny_family") or model_type)
    if backbone == "tiny-pretrained":
        base = f"`tiny-pretrained` (rematch's shipped, generatively pretrained tiny {family}, for tests and the demo)"
    elif backbone == "tiny" or backbone.startswith("tiny:"):
        base = f"`tiny` (a tiny {family} with random weights, for tests)"
    elif backbone:
        base = f"`{backbone}`"
    else:
        base = f"a {model_type} backbone"
    if trained is None:
        return f"built on {base}"
    return f"fine-tuned from {base}" if trained else f"on {base}, with untrained (random) ReMatch heads"


def _usage(reference: str, output_format: str, config: Mapping[str, Any]) -> str:
    if output_format == "transformers":
        return "\n".join([
            "## Usage (transformers)", "", "```python",
            "from rematch_embedding import ExportedEmbedder  # the file in this directory (no rematch needed)", "",
            f"model = ExportedEmbedder(\"{reference}\")",
            "queries = model.embed([\"a red circle\"], role=\"query\")",
            "documents = model.embed([{\"image\": \"photo.jpg\"}, {\"text\": \"a blue star\"}], role=\"document\")",
            "scores = queries @ documents.T", "```", "",
            "By hand, with `transformers` alone: the instruction goes into the system turn, image and text into "
            "the user turn, and the assistant turn holds the role's K tokens; the embedding is the mean of the "
            "final states at those K tokens, L2-normalised (`rematch_embedding.json` has K, the tokens and the "
            "default instructions; texts over its `max_text_tokens` are cut first, as `rematch_embedding.py` "
            "does). One item at a time:", "",
            "```python", *_BY_HAND.format(reference=reference).splitlines(), "```"])
    if output_format == "sentence-transformers":
        return "\n".join([
            "## Usage (sentence-transformers)", "", "```python",
            "from sentence_transformers import SentenceTransformer", "",
            f"model = SentenceTransformer(\"{reference}\", trust_remote_code=True)",
            "queries = model.encode_query([\"a red circle\"])",
            "documents = model.encode_document([{\"image\": \"photo.jpg\"}, \"a blue star\"])",
            "scores = model.similarity(queries, documents)", "```"])
    return "\n".join([
        "## Usage", "", "Python:", "", "```python", "from rematch import ReMatchModel", "",
        f"model = ReMatchModel.from_pretrained(\"{reference}\")",
        "queries = model.encode([\"a red circle\"], role=\"query\")",
        "documents = model.encode([{\"image\": \"photo.jpg\"}, {\"text\": \"a blue star\"}], role=\"document\")",
        "scores = queries @ documents.T  # unit vectors: cosine similarity", "```", "",
        "Command line:", "", "```bash",
        f"rematch encode --model {reference} --input items.jsonl --role document --out documents.npy",
        f"rematch index build --model {reference} --corpus corpus.jsonl --out index/",
        "rematch search --index index/ --text \"a red circle\" -k 10",
        f"rematch export {reference} exported/ --format sentence-transformers", "```"])


#: The by-hand recipe of a transformers export's card (tests/hub/test_card_recipes.py runs it on an export).
_BY_HAND = """import json

import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

path = "{reference}"
with open(f"{{path}}/rematch_embedding.json") as file:
    settings = json.load(file)
tokenizer = AutoTokenizer.from_pretrained(path)
image_processor = AutoImageProcessor.from_pretrained(path)
model = AutoModelForImageTextToText.from_pretrained(path).eval()
image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")


def embed(text="", image=None, instruction=None, role="query"):
    if instruction is None and role == "document":
        instruction = settings["document_instruction"]
    system = instruction or settings["system_prompt"]
    turn = "" if system in settings["no_system_turn_for"] else f"<|im_start|>system\\n{{system}}<|im_end|>\\n"
    inputs, vision = {{}}, ""
    if image is not None:
        pixels = image_processor(images=[Image.open(image).convert("RGB")], return_tensors="pt")
        count = int(pixels["image_grid_thw"].prod()) // image_processor.merge_size ** 2
        vision = "<|vision_start|>" + "<|image_pad|>" * count + "<|vision_end|>"
        inputs.update(pixel_values=pixels["pixel_values"], image_grid_thw=pixels["image_grid_thw"])
    chat = (f"{{turn}}<|im_start|>user\\n{{vision}}{{text}}<|im_end|>\\n<|im_start|>assistant\\n"
            + "".join(settings["role_tokens"][role]))
    tokens = tokenizer(chat, return_tensors="pt")
    inputs.update(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                  mm_token_type_ids=(tokens["input_ids"] == image_pad).int())  # marks the image tokens
    with torch.inference_mode():
        states = model.model(**inputs).last_hidden_state[0].float()
    k = settings["num_tokens"]
    pooled = states[-k:].mean(dim=0) if k and settings["pooling"] == "mean" else states[-1]
    return torch.nn.functional.normalize(pooled, dim=-1)


query = embed("a red circle")
document = embed(image="photo.jpg", role="document")
print(float(query @ document))  # cosine similarity
"""


def _eval_table(table: EvalTable) -> str:
    lines = ["## Evaluation (MMEB protocol)", "",
             f"Scores in % ({table.primary_metric}, MMEB's Precision@1); group scores are unweighted means over "
             "their subsets.", *table.notes]
    lines += ["", "| group | subsets | score |", "|---|---:|---:|"]
    lines += [f"| {name} | {count} | {_percent(value)} |" for name, count, value in table.groups]
    lines += ["", "| subset | score |", "|---|---:|"]
    lines += [f"| {name} | {_percent(value)} |" for name, value in table.subsets]
    return "\n".join(lines)


def _percent(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise EvalSummaryError(f"evaluation summary: expected a number, got {value!r}")
    return f"{100 * value:.2f}"


def _recipe(training_config: Mapping[str, Any]) -> str:
    lines = ["## Training recipe", "", "| setting | value |", "|---|---|"]
    for section, key in RECIPE_KEYS:
        values = training_config.get(section)
        if isinstance(values, Mapping) and key in values:
            lines.append(f"| {section}.{key} | {_cell(values[key])} |")
    lines += ["", "<details><summary>The run's full config</summary>", "", "```yaml",
              yaml.safe_dump(dict(training_config), sort_keys=False, allow_unicode=True).rstrip(), "```", "",
              "</details>"]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    text = ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    return text.replace("|", "\\|") or "—"


def write_saved_model_card(model, directory: Path, destination: Path) -> None:
    """The card (and the run's config) of a directory ``save_pretrained`` is writing.

    ``directory`` is the staging folder, ``destination`` where it will be renamed to. The
    recipe comes from the run directory the model is saved into (``RUN/model`` beside
    ``RUN/config.yaml`` and ``RUN/run.json``), or from the directory the model was loaded
    from, so a re-saved (e.g. LoRA-merged) model keeps it.
    """
    destination = Path(destination)
    run_dir = destination.absolute().parent
    loaded_from = Path(model.heads_source) if model.heads_source and os.path.isdir(model.heads_source) else None
    if (run_dir / RUN_RECORD_NAME).is_file() and (run_dir / RUN_CONFIG_NAME).is_file():
        shutil.copyfile(run_dir / RUN_CONFIG_NAME, directory / TRAINING_CONFIG_NAME)
    elif loaded_from is not None and (loaded_from / TRAINING_CONFIG_NAME).is_file():
        shutil.copyfile(loaded_from / TRAINING_CONFIG_NAME, directory / TRAINING_CONFIG_NAME)
    card = model_card_for(model, model_dir=directory, location=str(destination))
    (directory / CARD_NAME).write_text(card, encoding="utf-8")
