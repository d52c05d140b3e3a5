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
import re
import typing
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file

from rematch.backbones import MODEL_CLASSES, TORCH_DTYPES, load_backbone, load_pretrained_backbone, load_weights
from rematch.backbones.processor import ImageOnlyQwenVLProcessor
from rematch.atomic import write_directory_atomically
from rematch.config import ROLES, SAVED_BEFORE, ConfigError, ModelConfig, from_dict
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


#: How ``ReMatchModel.fingerprint`` is made. 1: configuration and weights (models saved before
#: scheme 2 keep it, so their indexes and caches still match); 2: also the processor
#: (``preprocessor_config.json``, the tokenizer) and the backbone's configuration, which change
#: vectors without changing a weight.
FINGERPRINT_SCHEME = 2

#: Backbone config keys that say how the weights are stored or named, not what they compute.
_VOLATILE_CONFIG_KEYS = frozenset({"_name_or_path", "architectures", "dtype", "torch_dtype", "transformers_version",
                                   "_attn_implementation", "attn_implementation", "_attn_implementation_autoset",
                                   "_attn_implementation_internal", "_commit_hash", "use_cache", "output_attentions",
                                   "output_hidden_states", "return_dict", "_processor_class", "processor_class"})


def _stable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _stable(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))
                if k not in _VOLATILE_CONFIG_KEYS}
    if isinstance(value, (list, tuple)):
        return [_stable(v) for v in value]
    return value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)


class ProcessorIdentity:
    """What besides the weights and the ReMatch config decides a vector: the image processor's
    settings (patch and merge sizes, pixel bounds, normalisation), the tokenizer (vocabulary,
    merges, added tokens) and the backbone's configuration. Taken when the model is built, so an
    evaluation that sets other input limits for a while does not change it; hashed on first use."""

    def __init__(self, processor, backbone_config) -> None:
        image_processor = getattr(processor, "image_processor", None)
        self._image = _stable(image_processor.to_dict()) if image_processor is not None else None
        self._backbone = _stable(backbone_config.to_dict()) if backbone_config is not None else None
        self._tokenizer = getattr(processor, "tokenizer", None)
        self._digest: str | None = None

    def digest(self) -> str:
        if self._digest is None:
            backend = getattr(self._tokenizer, "backend_tokenizer", None)
            tokenizer = backend.to_str() if backend is not None else repr(sorted(
                (self._tokenizer.get_vocab() if self._tokenizer is not None else {}).items()))
            text = json.dumps({"image_processor": self._image, "backbone": self._backbone}, sort_keys=True,
                              default=repr)
            digest = hashlib.blake2b(digest_size=16)
            digest.update(text.encode("utf-8"))
            digest.update(b"\x00")
            digest.update(tokenizer.encode("utf-8"))
            self._digest = digest.hexdigest()
        return self._digest


# ---------------------------------------------------------------------------- weight checksums

#: Weight files whose checksums rematch_config.json records (the backbone, its LoRA adapter, the heads).
_WEIGHT_FILE = re.compile(r"(model|adapter_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)|" + re.escape(HEADS_NAME))
#: Files up to this size are hashed whole; larger ones (a 7B backbone) by 256 evenly spaced
#: 64 KiB blocks and their size, which tells another model's weights apart at load time
#: without reading gigabytes.
_FULLY_HASHED_BYTES = 256 << 20
_SAMPLED_BLOCKS, _BLOCK_BYTES = 256, 64 << 10


def file_checksum(path: Path) -> str:
    """``full:<blake2b>`` of the whole file, or ``sampled:<blake2b>`` of its size and blocks."""
    size = path.stat().st_size
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{size}:".encode())
    with open(path, "rb") as handle:
        if size <= _FULLY_HASHED_BYTES:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
            return f"full:{digest.hexdigest()}"
        for block in range(_SAMPLED_BLOCKS):
            handle.seek(block * (size - _BLOCK_BYTES) // (_SAMPLED_BLOCKS - 1))
            digest.update(handle.read(_BLOCK_BYTES))
    return f"sampled:{digest.hexdigest()}"


def weight_checksums(directory: Path) -> dict[str, str]:
    return {path.name: file_checksum(path) for path in sorted(directory.iterdir())
            if path.is_file() and _WEIGHT_FILE.fullmatch(path.name)}


def _check_checksums(path: Path, meta: Mapping[str, Any]) -> None:
    """Refuse weight files that are not the ones the model was saved with: heads or a backbone
    copied in from another model gave vectors of neither, silently."""
    recorded = meta.get("checksums")
    if recorded is None:  # saved before checksums were recorded
        return
    if not isinstance(recorded, Mapping):
        raise CheckpointMismatchError(f"{path / CONFIG_NAME}: field 'checksums' must be an object")
    for name, checksum in sorted(recorded.items()):
        file = path / str(name)
        if not file.is_file():
            raise CheckpointMismatchError(f"{path}: {name} is missing; copy the whole directory that "
                                          "save_pretrained wrote")
        if file_checksum(file) != checksum:
            what = "ReMatch heads" if name == HEADS_NAME else "LoRA adapter" if str(name).startswith("adapter") \
                else "backbone weights"
            raise CheckpointMismatchError(f"{file}: the {what} file is damaged or truncated, or is not the file this "
                                          f"model was saved with (its checksum differs from the one {CONFIG_NAME} "
                                          "records; e.g. copied in from another model); copy the model directory "
                                          "again")
    extra = sorted(name for name in weight_checksums(path) if name not in recorded)
    if extra:
        raise CheckpointMismatchError(f"{path}: {', '.join(extra)} {'is' if len(extra) == 1 else 'are'} not part "
                                      f"of the saved model ({CONFIG_NAME} records no such file); remove "
                                      f"{'it' if len(extra) == 1 else 'them'} or copy the model directory again")


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
        "fingerprint_scheme": FINGERPRINT_SCHEME,
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
        meta["checksums"] = weight_checksums(directory)  # loading refuses weights swapped in from elsewhere
        (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        write_saved_model_card(model, directory, path)  # README.md (+ the run's config when saved into a run)

    write_directory_atomically(path, write, is_ours=lambda target: (target / CONFIG_NAME).is_file(),
                               what="a saved ReMatch model", overwrite=overwrite, own_entry=is_saved_model_entry)


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
    _check_checksums(path, meta)
    # a field the file lacks was added after the model was saved: it gets the value the model was
    # trained with (config.SAVED_BEFORE), not today's default
    saved = {**SAVED_BEFORE, **meta["model"]}
    where = str(path / CONFIG_NAME)
    _check_saved_types(saved, where)
    config = from_dict(ModelConfig, saved, where=where)
    try:
        config.validate()
    except ConfigError as error:
        raise CheckpointMismatchError(f"{where}: {error}; the file is damaged or was edited, copy the model "
                                      "directory again") from None
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
    model.fingerprint_scheme = _fingerprint_scheme(meta, path)
    if meta.get("untrained"):  # saved straight after it was built (`rematch tiny`): its heads are random
        model.mark_untrained()
    else:
        model.heads_source = os.fspath(spec) + (f"@{revision}" if revision else "")
    return model


def _fingerprint_scheme(meta: Mapping[str, Any], path: Path) -> int:
    scheme = meta.get("fingerprint_scheme", 1)  # saved before schemes: configuration and weights only
    if isinstance(scheme, bool) or scheme not in range(1, FINGERPRINT_SCHEME + 1):
        raise CheckpointMismatchError(f"{path / CONFIG_NAME}: fingerprint_scheme {scheme!r} is not one this "
                                      f"rematch knows (1 to {FINGERPRINT_SCHEME}); load it with a newer rematch")
    return scheme


def _check_saved_types(saved: Mapping[str, Any], where: str) -> None:
    """A saved configuration is written by rematch: an integer field holding a float (``max_text_tokens:
    512.5``) or a number as text was edited by hand, and is refused rather than rounded."""
    hints = typing.get_type_hints(ModelConfig)
    for name, value in saved.items():
        hint = hints.get(name)
        if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise CheckpointMismatchError(f"{where}: model.{name} must be an integer, got {value!r}; the file was "
                                          "edited or is damaged, copy the model directory again")
        if hint is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise CheckpointMismatchError(f"{where}: model.{name} must be a number, got {value!r}")


def is_saved_model_entry(name: str) -> bool:
    """Whether ``name`` is a file a saved ReMatch model holds: what replacing a model directory may
    delete. Anything else in it -- the user's notes, an evaluation folder -- makes the
    replacement refused instead (:func:`rematch.atomic.check_replaceable`)."""
    return _SAVED_MODEL_ENTRY.fullmatch(name) is not None


_SAVED_MODEL_ENTRY = re.compile(
    r"(config|generation_config|preprocessor_config|processor_config|video_preprocessor_config|rematch_config|"
    r"tokenizer|tokenizer_config|special_tokens_map|added_tokens|vocab|chat_template|adapter_config|"
    r"(model|pytorch_model)\.(safetensors|bin)\.index)\.json|"
    r"(model|pytorch_model|adapter_model|rematch_heads)(-\d{5}-of-\d{5})?\.(safetensors|bin)|"
    r"merges\.txt|tokenizer\.model|chat_template\.jinja|README\.md|rematch_training_config\.yaml")


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
        if not tensors[name].is_floating_point():  # int heads were cast and encoded silently
            raise CheckpointMismatchError(f"{heads_file}: {name} holds {tensors[name].dtype} values, not floating "
                                          "point; the file is not one rematch wrote, copy the model again")
        if not bool(torch.isfinite(tensors[name]).all()):  # inf / NaN give NaN vectors or none at all
            raise CheckpointMismatchError(f"{heads_file}: {name} holds inf or NaN values; the model is damaged "
                                          "(or diverged in training), use another checkpoint")
    with torch.no_grad():
        model.query_tokens.copy_(tensors["query_tokens"])
        model.document_tokens.copy_(tensors["document_tokens"])
        model.projector.load_state_dict({k[len("projector."):]: v for k, v in tensors.items()
                                         if k.startswith("projector.")})
