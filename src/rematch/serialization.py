"""Saving and loading ReMatch model directories.

Layout of a saved model (a directory that is also a valid Hugging Face checkpoint)::

    config.json, model*.safetensors     the backbone              (full fine-tuning)
    adapter_config.json, adapter_model.safetensors   or a PEFT adapter + base reference
    tokenizer*.json, preprocessor_config.json        the processor
    rematch_heads.safetensors           learnable tokens (query, document) and projector
    rematch_config.json                 ModelConfig + the facts loading must check

Directories are written to a temporary sibling and renamed into place, so a crash
never leaves a half-written model where a complete one is expected.

Loading takes a local path or a hub id (resolved to a snapshot by :mod:`rematch.hub.resolve`, then
read like any directory), and so does a LoRA adapter's base reference. A directory without
``rematch_config.json`` is refused: only an explicit ``new_heads=True`` builds fresh,
untrained ReMatch parts on a bare backbone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file

from rematch.backbones import MODEL_CLASSES, TORCH_DTYPES, load_backbone, load_pretrained_backbone, load_weights
from rematch.backbones.processor import ImageOnlyQwenVLProcessor
from rematch.atomic import write_directory_atomically
from rematch.config import ROLES, SAVED_BEFORE, ModelConfig, from_dict
from rematch.hub.card import write_saved_model_card
from rematch.hub.resolve import ModelNotFoundError, resolve_model_dir
from rematch.saved_model import (
    CONFIG_NAME,
    FORMAT_VERSION,
    HEADS_NAME,
    CheckpointMismatchError,
    NotAReMatchModelError,
    read_rematch_meta,
)

# ---------------------------------------------------------------------------- fingerprints


#: How ``base_fingerprint`` in rematch_config.json was computed: "full" hashes every byte;
#: models saved before it existed carry a strided-sample fingerprint ("sampled").
FINGERPRINT_METHOD = "full"


def weights_fingerprint(state_dict: Mapping[str, torch.Tensor], method: str = FINGERPRINT_METHOD) -> str:
    """The identity of a module's weights: names, dtypes, shapes and every byte of every tensor.

    Indexes, embedding caches and LoRA adapters are tied to the exact weights they were made
    with; a sample of each tensor missed a change in a few embedding rows, so a stale index
    or cached vectors were served as if they came from the new model. BLAKE2b runs at about a
    GB/s, so even a 7B model costs seconds, and :meth:`ReMatchModel.fingerprint` caches it.
    ``method="sampled"`` reproduces the older fingerprint (a strided sample) of models saved
    before, only to check their LoRA base.
    """
    if method == "sampled":
        return _sampled_fingerprint(state_dict)
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(state_dict.items()):
        data = tensor.detach().contiguous().cpu()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)}:".encode())
        if data.numel():
            digest.update(data.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


def _sampled_fingerprint(state_dict: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(state_dict.items()):
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 1024)].float().cpu()
        digest.update(f"{name}:{tuple(tensor.shape)}:".encode())
        digest.update(sample.numpy().round(5).tobytes())
    return digest.hexdigest()[:32]


# ---------------------------------------------------------------------------- save


def save_rematch_model(model, path: Path, overwrite: bool = False) -> None:
    backbone = model.backbone
    is_peft = hasattr(backbone, "peft_config")
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "model": dataclasses.asdict(model.config),
        "model_type": model._causal_lm().config.model_type,
        "hidden_size": model.hidden_size,
        "num_tokens": model.num_tokens,
        "roles": list(ROLES),
        "peft": is_peft,
        "untrained": model.is_untrained(),  # read back by load_rematch_model: see ReMatchModel.is_untrained
    }
    if is_peft:
        meta["base_fingerprint"] = weights_fingerprint(base_state_dict(backbone.get_base_model()))
        meta["fingerprint_method"] = FINGERPRINT_METHOD
    heads = {
        "query_tokens": model.query_tokens.detach().float().cpu().contiguous(),
        "document_tokens": model.document_tokens.detach().float().cpu().contiguous(),
    }
    heads.update({f"projector.{k}": v.detach().float().cpu().contiguous()
                  for k, v in model.projector.state_dict().items()})

    def write(directory: Path) -> None:
        backbone.save_pretrained(directory)
        model.processor.save_pretrained(directory)
        save_file(heads, str(directory / HEADS_NAME), metadata={"format": "pt"})
        (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        write_saved_model_card(model, directory, path)  # README.md (+ the run's config when saved into a run)

    write_directory_atomically(path, write, is_ours=lambda target: (target / CONFIG_NAME).is_file(),
                               what="a saved ReMatch model", overwrite=overwrite)


def base_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base weights of a (possibly LoRA-injected) model, under their original names."""
    result = {}
    for name, tensor in model.state_dict().items():
        if "lora_" in name or "lora_magnitude_vector" in name:
            continue
        result[name.replace(".base_layer.", ".")] = tensor
    return result


# ---------------------------------------------------------------------------- load


def load_rematch_model(cls, spec: str | os.PathLike, expected: Mapping[str, Any], *, revision: str | None = None,
                       new_heads: bool = False):
    """A model from a saved ReMatch directory (a local path or hub id, see :mod:`rematch.hub.resolve`).

    A directory without ``rematch_config.json`` is refused: loading it would attach random
    ReMatch heads and every embedding would be silently meaningless. ``new_heads=True``
    asks for exactly that on a bare backbone (as :meth:`ReMatchModel.from_backbone` does).
    """
    path = resolve_model_dir(spec, revision)
    meta = read_rematch_meta(path)
    if meta is None:
        if not new_heads or (path / HEADS_NAME).is_file():
            raise NotAReMatchModelError(_not_a_rematch_model(spec, path))
        return _with_fresh_heads(cls, os.fspath(spec) + (f"@{revision}" if revision else ""), path, expected)
    if new_heads:
        raise CheckpointMismatchError(
            f"{spec} is a saved ReMatch model with its own heads; new_heads=True would throw them away. "
            "Load it without new_heads, or use ReMatchModel.from_backbone() on a bare backbone")

    _check_required_files(path, meta)
    # a field the file lacks was added after the model was saved: it gets the value the model was
    # trained with (config.SAVED_BEFORE), not today's default
    saved = {**SAVED_BEFORE, **meta["model"]}
    config = from_dict(ModelConfig, saved, where=str(path / CONFIG_NAME))
    _check_expectations(path, config, meta, expected)
    config = dataclasses.replace(config, **{k: v for k, v in expected.items()
                                            if k in ("dtype", "attn_implementation")})
    if meta.get("peft"):
        backbone, _ = _load_peft_backbone(path, config, meta)
    else:
        model_class = MODEL_CLASSES.get(meta["model_type"])
        if model_class is None:
            raise CheckpointMismatchError(f"{path}: unsupported backbone type {meta['model_type']!r}")
        backbone = load_weights(model_class, path, TORCH_DTYPES[config.dtype], config.attn_implementation,
                                allow_unexpected=False)
    processor = ImageOnlyQwenVLProcessor.from_pretrained(path)
    model = cls(backbone, processor, config)
    if model.hidden_size != meta["hidden_size"]:
        raise CheckpointMismatchError(f"{path}: {CONFIG_NAME} says hidden size {meta['hidden_size']} but the "
                                      f"backbone has {model.hidden_size}")
    _load_heads(model, path)
    if meta.get("untrained"):  # saved straight after it was built (`rematch tiny`): its heads are random
        model.mark_untrained()
    else:
        model.heads_source = os.fspath(spec) + (f"@{revision}" if revision else "")
    return model


def _check_required_files(path: Path, meta: Mapping[str, Any]) -> None:
    """Every file loading will read, checked before any of it is read.

    Without ``config.json`` transformers would build its *default* configuration (an
    80-layer model: tens of GB) before failing; a missing tokenizer or heads file would
    fail late with a message about something else.
    """
    required = [HEADS_NAME, "preprocessor_config.json"]
    required += ["adapter_config.json"] if meta.get("peft") else ["config.json"]
    missing = [name for name in required if not (path / name).is_file()]
    if meta.get("peft") and not any((path / name).is_file() for name in ("adapter_model.safetensors",
                                                                          "adapter_model.bin")):
        missing.append("adapter_model.safetensors")
    if not any((path / name).is_file() for name in ("tokenizer.json", "vocab.json")):
        missing.append("tokenizer.json")
    if missing:
        raise CheckpointMismatchError(f"{path}: incomplete ReMatch model directory, missing {', '.join(missing)}; "
                                      "copy the whole directory that save_pretrained wrote")


def _not_a_rematch_model(spec: str | os.PathLike, path: Path) -> str:
    where = f"{spec}" if os.fspath(spec) == os.fspath(path) else f"{spec} ({path})"
    if (path / HEADS_NAME).is_file():
        return (f"{where} has {HEADS_NAME} but no {CONFIG_NAME}: an incomplete copy of a ReMatch model; "
                f"copy {CONFIG_NAME} from where the model was saved")
    if not (path / "config.json").is_file():
        return f"{where} is not a model directory: it has neither {CONFIG_NAME} nor config.json"
    return (f"{where} is a bare backbone checkpoint, not a saved ReMatch model (no {CONFIG_NAME}), so it has no "
            f"trained ReMatch heads; for fresh, untrained heads on it use ReMatchModel.from_backbone({spec!r}) "
            f"or ReMatchModel.from_pretrained({spec!r}, new_heads=True)")


def _with_fresh_heads(cls, spec: str | os.PathLike, path: Path, expected: Mapping[str, Any]):
    """Fresh ReMatch parts on the bare backbone in ``path``; the config records ``spec`` (the hub
    id and revision, not a cache path) so a LoRA adapter trained on it names a base that resolves
    on another machine too."""
    field_names = {field.name for field in dataclasses.fields(ModelConfig)} - {"backbone"}
    fields = {("num_tokens" if key == "k" else key): value for key, value in expected.items()}
    unknown = sorted(set(fields) - field_names)
    if unknown:
        raise TypeError(f"from_pretrained(new_heads=True) got unexpected keyword argument(s) {unknown}; "
                        f"ModelConfig fields are {sorted(field_names)}")
    fields.setdefault("pooling", "mean" if fields.get("num_tokens", ModelConfig.num_tokens) else "last")
    config = ModelConfig(backbone=os.fspath(spec), **fields)
    config.validate()
    backbone, processor = load_pretrained_backbone(path, config)
    return cls(backbone, processor, config)


def _check_expectations(path: Path, config: ModelConfig, meta: Mapping[str, Any],
                        expected: Mapping[str, Any]) -> None:
    aliases = {"k": "num_tokens"}
    for key, value in expected.items():
        key = aliases.get(key, key)
        if key in ("dtype", "attn_implementation"):
            continue
        if key == "hidden_size":
            saved = meta["hidden_size"]
        elif key == "roles":
            saved = meta.get("roles")
            value = list(value)
        elif hasattr(config, key):
            saved = getattr(config, key)
        else:
            raise TypeError(f"from_pretrained() got an unexpected keyword argument {key!r}")
        if saved != value:
            raise CheckpointMismatchError(
                f"{path} was saved with {key}={saved!r}, but {key}={value!r} was requested; "
                f"load it without {key}= or point to a model saved with {key}={value!r}")
    if meta.get("roles") != list(ROLES):
        raise CheckpointMismatchError(f"{path}: saved roles {meta.get('roles')} differ from {list(ROLES)}")


def _load_peft_backbone(path: Path, config: ModelConfig, meta: Mapping[str, Any]):
    from peft import PeftModel
    from safetensors import SafetensorError

    try:
        adapter_config = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointMismatchError(f"{path / 'adapter_config.json'}: not valid JSON ({error})") from error
    if not isinstance(adapter_config, dict):
        raise CheckpointMismatchError(f"{path / 'adapter_config.json'}: expected a JSON object")
    if config.backbone in ("tiny", "tiny-pretrained"):  # built offline / shipped with the package
        base, processor = load_backbone(config)
    else:
        # the base is referenced by name (a hub id or a path): resolved like any model spec
        base_reference = config.backbone or adapter_config.get("base_model_name_or_path")
        try:
            base_dir = resolve_model_dir(base_reference)
        except ModelNotFoundError as error:
            raise ModelNotFoundError(f"{path}: the base model of its LoRA adapter, {base_reference!r}, is not "
                                     f"available: {error}") from error
        base, processor = load_pretrained_backbone(base_dir, config)
    fingerprint = weights_fingerprint(base.state_dict(), meta.get("fingerprint_method", "sampled"))
    if meta.get("base_fingerprint") and fingerprint != meta["base_fingerprint"]:
        raise CheckpointMismatchError(
            f"{path}: the LoRA adapter was trained on a different base model than {config.backbone!r} "
            f"(weights fingerprint {fingerprint} != saved {meta['base_fingerprint']})")
    try:
        return PeftModel.from_pretrained(base, str(path), is_trainable=False).eval(), processor
    except SafetensorError as error:
        raise CheckpointMismatchError(f"{path}: cannot read the LoRA adapter weights ({error}); the file is damaged "
                                      "or truncated, copy the model again") from error


def _load_heads(model, path: Path) -> None:
    from safetensors import SafetensorError

    heads_file = path / HEADS_NAME
    if not heads_file.is_file():
        raise CheckpointMismatchError(f"{path}: {HEADS_NAME} is missing")
    try:
        tensors = load_file(str(heads_file))
    except SafetensorError as error:
        raise CheckpointMismatchError(f"{heads_file}: cannot read it ({error}); the file is damaged or truncated, "
                                      "copy it again from where the model was saved") from error
    expected_shapes = {"query_tokens": tuple(model.query_tokens.shape),
                       "document_tokens": tuple(model.document_tokens.shape)}
    expected_shapes.update({f"projector.{k}": tuple(v.shape) for k, v in model.projector.state_dict().items()})
    missing = sorted(set(expected_shapes) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected_shapes))
    if missing or unexpected:
        raise CheckpointMismatchError(f"{heads_file}: missing tensors {missing}, unexpected {unexpected}")
    for name, shape in expected_shapes.items():
        if tuple(tensors[name].shape) != shape:
            raise CheckpointMismatchError(f"{heads_file}: {name} has shape {tuple(tensors[name].shape)}, "
                                          f"the configuration implies {shape}")
    with torch.no_grad():
        model.query_tokens.copy_(tensors["query_tokens"])
        model.document_tokens.copy_(tensors["document_tokens"])
        model.projector.load_state_dict({k[len("projector."):]: v for k, v in tensors.items()
                                         if k.startswith("projector.")})
