"""Configuration dataclasses: every default of the project lives here, once.

A run is described by one :class:`Config` tree. It can be built in code, read from a
YAML file (:func:`load_config`) and adjusted with dotted overrides such as
``model.num_tokens=8`` (:func:`apply_overrides`), which is what the CLI's
``--model.num_tokens 8`` turns into. Overrides are type-checked against the dataclass
field types so a typo or a wrong type fails loudly instead of being ignored.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

import yaml

ROLES = ("query", "document")
#: ModelConfig.video_sampling values (rematch.data.video.SAMPLING_RULES).
VIDEO_SAMPLING_RULES = ("fps", "mmeb_v2")
#: ModelConfig.target_prompt_style values (rematch.instructions).
TARGET_PROMPT_STYLES = ("b3", "system")
#: What the matching loss is a cross-entropy over (``loss.matching_vocabulary``): see LossConfig.
MATCHING_VOCABULARIES = ("full", "yes_no")
#: ModelConfig fields added after models were saved, with the value a model saved before the
#: field existed behaves as. Loading fills them in (a ``rematch_config.json`` without the field
#: keeps encoding as it was trained), and a model's fingerprint leaves a field out while it has
#: this value, so indexes and caches of those models keep matching them.
SAVED_BEFORE: dict[str, Any] = {"video_fps": 1.0, "video_max_frames": 16, "video_max_pixels": None,
                                "video_sampling": "fps", "target_prompt_style": "system",
                                "projector_centering": False}

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration file or override names an unknown key or a value of the wrong type."""


@dataclass
class ModelConfig:
    """What defines a ReMatch model: the backbone, the K learnable tokens and how they fuse.

    These fields are written to ``rematch_config.json`` next to the weights, so a saved
    model always reloads with the settings it was trained with.
    """

    backbone: str = "tiny"
    """A Hugging Face hub id or local directory of a Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint,
    ``"tiny"`` for a randomly initialised offline model (see ``tiny_size`` and ``tiny_family``), or
    ``"tiny-pretrained"`` for the shipped tiny Qwen2-VL after generative pre-training on the
    shapes world (docs/pretraining.md; ``tiny_size``/``tiny_family`` do not apply)."""
    tiny_family: str = "qwen2_vl"
    """Architecture of the offline model when ``backbone == "tiny"``: qwen2_vl, qwen2_5_vl or qwen3_vl."""
    tiny_size: str = "tiny"
    """Size preset of the offline model: tiny (~1M params), small (~6M), base (~20M)."""
    num_tokens: int = 16
    """K, the number of learnable embedding tokens appended to every input (0 = none)."""
    pooling: str = "mean"
    """How the K final states become one vector: "mean" (ReMatch) or "last" (the last
    position; with ``num_tokens=0`` this is plain VLM2Vec-style last-token pooling)."""
    projector_layers: int = 2
    """Depth of the MLP that maps an embedding back to one soft input token for matching."""
    projector_centering: bool = True
    """Subtract the running mean of the embeddings before the projector (rematch.layers.
    EmbeddingProjector): without it the matching head could not compare two soft views of
    trained, anisotropic embeddings (docs/pretraining.md). Models saved before it: false."""
    min_pixels: int = 56 * 56
    """Images smaller than this are upscaled (Qwen's smart resize, sides multiples of 28)."""
    max_pixels: int = 448 * 448
    """Images larger than this are downscaled; bounds memory and image-token count."""
    video_fps: float = 1.0
    """Frames sampled per second of a video file (frames given as a directory or list are taken
    to be sampled at this rate already); see rematch.data.video."""
    video_max_frames: int = 16
    """At most this many frames per video (uniformly spread); an odd count gets its last frame
    repeated, since the vision tower merges frames two by two."""
    video_sampling: str = "fps"
    """Which frames of a video are taken: "fps" (``video_fps``, at most ``video_max_frames``) or
    "mmeb_v2" (the MMEB-V2 harness's ``np.linspace(0, n - 1, video_max_frames, dtype=int)`` over
    the saved frames; what ``eval mmeb-v2`` switches to). See rematch.data.video."""
    video_max_pixels: int | None = None
    """Per-frame pixel budget of a video (frames are resized like images, sides multiples of the
    tower's patch x merge size); None: ``max_pixels``."""
    max_text_tokens: int = 512
    """Text beyond this many tokens is truncated (images and the learnable tokens are kept);
    0 = no truncation (the official MMEB evaluation setting)."""
    max_instruction_tokens: int = 256
    """An instruction or system prompt beyond this many tokens is truncated."""
    max_sequence_tokens: int = 16384
    """An item whose whole sequence (chat wrapper, instruction, text, image tokens, K slots)
    is longer than this is an error naming the item, not an hour-long forward."""
    system_prompt: str = "You are a helpful assistant."
    """System turn used when an item carries no instruction of its own."""
    dtype: str = "float32"
    """Weights' dtype: float32, bfloat16 or float16."""
    attn_implementation: str = "auto"
    """Attention kernel of the vision tower and the embedding forward: "auto" (flash_attention_2
    when flash-attn is installed and the model is on CUDA in bf16/fp16, else sdpa), sdpa, eager
    or flash_attention_2. Forwards with a 4-D mask (packed matching) always run sdpa/eager
    (see rematch.backbones.attention)."""
    padding_free: bool = False
    """Embedding forward with a batch's items packed into one sequence (their own M-RoPE ids,
    a block-diagonal mask) instead of left-padded rows: no compute on padding. Off by default:
    on CPU with sdpa the block mask costs more than the padding saves (benchmarks/RESULTS.md)."""
    seed: int = 0
    """Seed for the offline backbone and the initial learnable tokens and projector."""
    matching_instruction: str = "Does the document match the query? Answer only Yes or No."
    """The user instruction of the generative matching branch (training and reranking)."""
    document_instructions: bool = True
    """Give every document without an instruction of its own its subset's target instruction
    (B3 / VLM2Vec-V2 style; the paper's ablation: +1.8 MMEB). Off in the VLM2Vec-style
    baseline. See :mod:`rematch.instructions`."""
    document_instruction_table: dict[str, str] = field(default_factory=dict)
    """Subset -> document instruction, over the built-in table (key "*": subsets not named).
    A model stores its complete table, so it encodes documents the way it was trained.
    Used by the "system" target prompt style."""
    target_prompt_style: str = "b3"
    """How documents get their target instruction (with ``document_instructions`` on):
    "b3" (B3's public recipe: an inline prefix on text-only documents by the subset's category,
    "Represent the class label: " / "Represent the answer: " / "Represent the image caption: ",
    none on documents with an image or video) or "system" (the subset's sentence from
    ``document_instruction_table`` in the system turn of every document). Models saved before
    this setting existed load as "system", which is how they were trained. See
    rematch.instructions."""

    @property
    def frame_max_pixels(self) -> int:
        """The per-frame pixel budget of videos: ``video_max_pixels``, or ``max_pixels`` when unset."""
        return self.max_pixels if self.video_max_pixels is None else self.video_max_pixels

    def validate(self) -> None:
        if self.num_tokens < 0:
            raise ConfigError(f"model.num_tokens must be >= 0, got {self.num_tokens}")
        if self.pooling not in ("mean", "last"):
            raise ConfigError(f"model.pooling must be 'mean' or 'last', got {self.pooling!r}")
        if self.num_tokens == 0 and self.pooling == "mean":
            raise ConfigError("model.num_tokens=0 has no learnable tokens to average: use model.pooling=last")
        if self.num_tokens >= self.max_sequence_tokens:  # else K alone allocates gigabytes before any check
            raise ConfigError(f"model.num_tokens ({self.num_tokens}) must be below model.max_sequence_tokens "
                              f"({self.max_sequence_tokens}): every input carries the K learnable tokens")
        if self.min_pixels < 0:
            raise ConfigError(f"model.min_pixels must be >= 0, got {self.min_pixels}")
        check_seed("model.seed", self.seed, 2**63 - 1)  # torch.Generator's range
        if self.min_pixels > self.max_pixels:
            raise ConfigError(f"model.min_pixels ({self.min_pixels}) > model.max_pixels ({self.max_pixels})")
        if not (isinstance(self.video_fps, (int, float)) and math.isfinite(self.video_fps) and self.video_fps > 0):
            raise ConfigError(f"model.video_fps must be a number > 0, got {self.video_fps!r}")
        if self.video_max_frames < 1:
            raise ConfigError(f"model.video_max_frames must be >= 1, got {self.video_max_frames}")
        if self.video_sampling not in VIDEO_SAMPLING_RULES:
            raise ConfigError(f"model.video_sampling must be one of {', '.join(VIDEO_SAMPLING_RULES)}, got "
                              f"{self.video_sampling!r}")
        if self.target_prompt_style not in TARGET_PROMPT_STYLES:
            raise ConfigError(f"model.target_prompt_style must be one of {', '.join(TARGET_PROMPT_STYLES)}, got "
                              f"{self.target_prompt_style!r}")
        if self.video_max_pixels is not None and self.video_max_pixels < max(1, self.min_pixels):
            raise ConfigError(f"model.video_max_pixels ({self.video_max_pixels}) must be >= model.min_pixels "
                              f"({self.min_pixels}) and >= 1 (or null: model.max_pixels)")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"model.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        for name in ("max_text_tokens", "max_instruction_tokens"):
            if getattr(self, name) < 0:
                raise ConfigError(f"model.{name} must be >= 0 (0 = no truncation), got {getattr(self, name)}")
        if self.max_sequence_tokens < 1:
            raise ConfigError(f"model.max_sequence_tokens must be >= 1, got {self.max_sequence_tokens}")
        if self.projector_layers < 1:
            raise ConfigError(f"model.projector_layers must be >= 1, got {self.projector_layers}")


@dataclass
class DataConfig:
    """Where training pairs come from.

    ``source`` is a local MMEB-style root (``ROOT/<Subset>/<split>.jsonl|parquet``), a
    Hugging Face dataset id (e.g. ``TIGER-Lab/MMEB-train``), a plain jsonl/csv file in the
    MMEB-train schema, or ``builtin`` for the shapes world generated into the run directory.
    """

    source: str = "builtin"
    subsets: list[str] = field(default_factory=list)
    """Subsets to train on (empty: every subset found)."""
    split: str = "train"
    image_root: str | None = None
    """Directory image paths are relative to (default: the source root)."""
    caps: dict[str, int] = field(default_factory=dict)
    """Per-subset maximum number of rows."""
    weights: dict[str, float] = field(default_factory=dict)
    """Per-subset mixing weights (default: proportional to size)."""
    skip_bad: bool = False
    """Skip (and count) bad rows instead of stopping at the first one."""
    strip_orphan_placeholders: bool = False
    """Drop (and count) an image placeholder in a text whose row has no image (published
    MMEB-train WebQA rows have this quirk; without this they are errors)."""
    num_workers: int = 0
    """Threads preparing batches ahead of the step (image loading, tokenisation)."""
    one_subset_per_batch: bool = True
    """Draw every global batch from a single subset (chosen with the mixing weights), so the
    in-batch negatives are same-task negatives, as multi-task embedding training usually does."""
    builtin_train_rows: int = 2000
    """Rows of the built-in shapes world to generate when ``source == "builtin"``."""
    builtin_seed: int = 0


@dataclass
class LossConfig:
    """Weights of the three loss terms (0 switches a term off) and the contrastive temperature."""

    temperature: float = 0.02
    contrastive: float = 1.0
    orthogonality: float = 0.5
    matching: float = 0.1
    matching_samples: int = 0
    """Samples per step that also run the matching branch (0 = the whole batch). Matching a
    sub-batch bounds its cost; the choice is random through the shuffled data order."""
    in_batch_negatives: bool = True
    """For rows without a hard negative, match against the most similar other positive."""
    hard_negatives: bool = True
    """Use the data's hard negatives (in the contrastive pool and for matching). False trains
    with in-batch negatives only, as the ablation's baseline does."""
    matching_vocabulary: str = "yes_no"
    """What the matching loss is a cross-entropy over. ``full``: the paper's L_qdm, the
    generative cross-entropy over the whole vocabulary at each answer position, the "Yes" or
    "No" token as the target (logits at the answer positions only, never the whole sequence);
    the paper recipes set it. ``yes_no``: a 2-way softmax over the "Yes" and "No" rows of the
    LM head, the default, so the demo and runs saved before the option keep their numbers.
    Reranking scores p(Yes) / (p(Yes) + p(No)) either way."""


@dataclass
class LoraSettings:
    """PEFT adapters on the language model (paper: LoRA r=32, alpha=64)."""

    enabled: bool = True
    r: int = 32
    alpha: int = 64
    dropout: float = 0.05
    dora: bool = False
    target_modules: str | None = None
    """Regex of module names (default: every attention and MLP projection of the language model)."""

    def validate(self) -> None:
        import re

        if self.r < 1:
            raise ConfigError(f"lora.r must be >= 1, got {self.r}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError(f"lora.alpha must be > 0, got {self.alpha}")
        if not (math.isfinite(self.dropout) and 0 <= self.dropout < 1):
            raise ConfigError(f"lora.dropout must be within [0, 1), got {self.dropout}")
        if self.target_modules is not None:
            try:
                re.compile(self.target_modules)
            except re.error as error:
                raise ConfigError(f"lora.target_modules is not a valid regular expression: {error}") from None


#: LR schedules of transformers' get_scheduler that need no extra arguments and step once per step.
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt")


@dataclass
class LoopConfig:
    """The ``train`` section every run of the training loop has (``rematch train`` and
    ``rematch pretrain``, :mod:`rematch.training.runner`): how long and how to optimise, and
    how the run directory is logged, checkpointed and reused.

    One base so a setting means the same thing, and is checked the same way, in both
    commands; each command's section derives from it, adds its own settings and may give
    these other defaults.
    """

    out: str = "runs/rematch"
    steps: int = 300
    batch_size: int = 8
    """Samples per process per step (the global batch is batch_size x processes)."""
    lr: float = 1e-4
    weight_decay: float = 0.0
    scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    seed: int = 0
    mixed_precision: str = "no"
    """no, bf16 or fp16 (accelerate's autocast)."""
    log_every: int = 1
    save_every: int = 0
    """Checkpoint every N steps (0: only at the end)."""
    keep_last: int = 2
    resume: bool = False
    """Continue from the newest complete checkpoint in ``out``."""
    overwrite: bool = False
    """Start over in an ``out`` that holds a previous run, deleting that run's outputs (without
    this or ``resume``, such a directory is refused)."""
    resume_with_changes: bool = False
    """Accept settings that differ from the checkpoint's when resuming (otherwise an error)."""
    plot: bool = True

    def validate(self) -> None:
        """Steps, optimiser and schedule values, logging and checkpoint intervals, and the seed."""
        if not 1 <= self.steps <= MAX_STEPS:
            raise ConfigError(f"train.steps must be within 1..{MAX_STEPS}, got {self.steps}")
        if not 1 <= self.batch_size <= MAX_BATCH_SIZE:
            raise ConfigError(f"train.batch_size must be within 1..{MAX_BATCH_SIZE}, got {self.batch_size}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"train.lr must be a finite number > 0, got {self.lr}")
        if not 0 <= self.warmup_ratio <= 1:
            raise ConfigError(f"train.warmup_ratio must be within [0, 1], got {self.warmup_ratio}")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0):
            raise ConfigError(f"train.max_grad_norm must be >= 0 (0 = no clipping), got {self.max_grad_norm}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"train.weight_decay must be >= 0, got {self.weight_decay}")
        if self.log_every < 1:
            raise ConfigError(f"train.log_every must be >= 1, got {self.log_every}")
        if self.save_every < 0 or self.keep_last < 0:
            raise ConfigError(f"train.save_every (0 = only at the end) and train.keep_last (0 = keep all) must be "
                              f">= 0, got {self.save_every} and {self.keep_last}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ConfigError(f"train.mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"train.scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        check_seed("train.seed", self.seed, 2**32 - 1)  # accelerate's set_seed also seeds NumPy


#: Upper bounds of a run's length and batch: far beyond any real run (the paper trains 2,500
#: steps of 128 per process), low enough that a typo (``--steps 2**70``) is an error, not a run
#: that never ends or a batch that fills the memory.
MAX_STEPS = 10**9
MAX_BATCH_SIZE = 1 << 16


@dataclass
class TrainConfig(LoopConfig):
    """How long and how to optimise a ReMatch model (``rematch train``)."""

    head_lr: float | None = None
    """Learning rate of the learnable tokens and projector (default: lr)."""
    gradient_checkpointing: bool = False
    grad_cache_chunk: int = 0
    """GradCache: embed the batch in chunks of this many items (0 = off, one plain forward).
    Gives the exact large-batch gradient with the activation memory of one chunk."""
    freeze_vision: bool = True
    """Keep the vision tower frozen during full fine-tuning (LoRA never touches it)."""

    def validate(self) -> None:
        super().validate()
        if self.head_lr is not None and not (math.isfinite(self.head_lr) and self.head_lr > 0):
            raise ConfigError(f"train.head_lr must be a finite number > 0 (or null), got {self.head_lr}")
        if self.grad_cache_chunk < 0:
            raise ConfigError(f"train.grad_cache_chunk must be >= 0, got {self.grad_cache_chunk}")
        if self.grad_cache_chunk and self.mixed_precision == "fp16":
            raise ConfigError("GradCache (train.grad_cache_chunk) needs mixed_precision no or bf16: fp16 loss "
                              "scaling across its several backward passes is not supported")


@dataclass
class Config:
    """The root of a run's configuration."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        self.model.validate()
        train = self.train
        train.validate()
        if train.batch_size < 2 and self.loss.contrastive:
            raise ConfigError("train.batch_size must be >= 2 for a contrastive loss")
        if self.loss.matching_samples < 0:
            raise ConfigError(f"loss.matching_samples must be >= 0 (0 = the whole batch), got "
                              f"{self.loss.matching_samples}")
        if self.data.num_workers < 0 or self.data.builtin_train_rows < 1:
            raise ConfigError("data.num_workers must be >= 0 and data.builtin_train_rows >= 1")
        if any(cap < 0 for cap in self.data.caps.values()) or any(
                not (math.isfinite(w) and w >= 0) for w in self.data.weights.values()):
            raise ConfigError("data.caps must be >= 0 and data.weights finite and >= 0")
        if not (math.isfinite(self.loss.temperature) and self.loss.temperature > 0):
            raise ConfigError(f"loss.temperature must be > 0, got {self.loss.temperature}")
        for name in ("contrastive", "orthogonality", "matching"):
            if not (math.isfinite(getattr(self.loss, name)) and getattr(self.loss, name) >= 0):
                raise ConfigError(f"loss.{name} must be >= 0")
        if not (self.loss.contrastive or self.loss.orthogonality or self.loss.matching):
            raise ConfigError("loss.contrastive, loss.orthogonality and loss.matching are all 0: there is nothing "
                              "to train; give at least one of them a weight > 0")
        if self.loss.matching_vocabulary not in MATCHING_VOCABULARIES:
            raise ConfigError(f"loss.matching_vocabulary must be one of {', '.join(MATCHING_VOCABULARIES)}, got "
                              f"{self.loss.matching_vocabulary!r}")
        check_seed("data.builtin_seed", self.data.builtin_seed, 2**32 - 1)
        if self.lora.enabled:  # PEFT checks these only when the model is built, some not at all
            self.lora.validate()


def check_seed(name: str, seed: int, high: int) -> None:
    """A seed the random generators take: torch and NumPy fail on an out-of-range one with an
    overflow message that names neither the setting nor the range."""
    if not 0 <= seed <= high:
        raise ConfigError(f"{name} must be within 0..{high}, got {seed}")


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, overrides: Sequence[str] | Mapping[str, Any] = (),
                cls: type[T] = Config) -> T:  # type: ignore[assignment]
    """Build a config from defaults, then a YAML file, then dotted overrides, in that order."""
    config = cls()
    if path is not None:
        data = read_config_file(path)
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level of a config file must be a mapping")
        config = merge_mapping(config, data, where=str(path))
    config = apply_overrides(config, overrides)
    if hasattr(config, "validate"):
        config.validate()
    return config


#: The largest config file read: a recipe is a few KB; a multi-GB (even sparse) file was read whole.
MAX_CONFIG_FILE_BYTES = 1 << 20


def read_config_file(path: str | Path) -> Any:
    """The parsed YAML of a config file: a missing, oversized, empty or unparsable file is a
    :class:`ConfigError` naming it (an empty file once trained on the defaults without a word)."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the config file ({error.strerror or error})") from None
    if path.is_dir():
        raise ConfigError(f"{path} is a directory, not a config file")
    if not path.is_file():
        raise ConfigError(f"{path} is not a regular file; give a YAML config file")
    if size > MAX_CONFIG_FILE_BYTES:
        raise ConfigError(f"{path}: {size} bytes, far more than a config file (at most {MAX_CONFIG_FILE_BYTES}); "
                          "is this the right file?")
    with open(path, encoding="utf-8") as handle:
        try:
            data = yaml.safe_load(handle.read(MAX_CONFIG_FILE_BYTES + 1))
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            raise ConfigError(f"{path}: not a valid YAML file ({' '.join(str(error).split())})") from None
    if data is None:
        raise ConfigError(f"{path}: the config file is empty; give the settings to change, or leave out --config "
                          "to use the defaults")
    return data


def merge_mapping(config: T, data: Mapping[str, Any], where: str = "config") -> T:
    """Return a copy of ``config`` with the nested mapping ``data`` applied to it."""
    flat: dict[str, Any] = {}

    def flatten(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping) and _is_dataclass_path(config, prefix):
            for key, sub in value.items():
                flatten(f"{prefix}.{key}" if prefix else str(key), sub)
        else:
            flat[prefix] = value

    flatten("", data)
    return apply_overrides(config, flat, where=where, parse_strings=False)


def apply_overrides(config: T, overrides: Sequence[str] | Mapping[str, Any], where: str = "override",
                    parse_strings: bool = True) -> T:
    """Apply ``key.sub=value`` overrides (strings are parsed as YAML scalars) to a copy."""
    if not isinstance(overrides, Mapping):
        pairs: dict[str, Any] = {}
        for text in overrides:
            if "=" not in text:
                raise ConfigError(f"{where}: expected key=value, got {text!r}")
            key, value = text.split("=", 1)
            pairs[key.strip()] = value
        overrides = pairs
    config = _deep_copy(config)
    for dotted, raw in overrides.items():
        _set_dotted(config, dotted, raw, where, parse_strings)
    return config


def to_dict(config: Any) -> dict[str, Any]:
    """A plain nested dict (for YAML/JSON dumps and reports)."""
    return dataclasses.asdict(config)


def dump_yaml(config: Any, path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(to_dict(config), handle, sort_keys=False)


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "config") -> T:
    """Build ``cls`` from a (possibly nested) dict, rejecting unknown keys."""
    return merge_mapping(cls(), data, where=where)


# --------------------------------------------------------------------------- internals


def _deep_copy(config: T) -> T:
    if not dataclasses.is_dataclass(config):
        return config
    values = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        values[f.name] = _deep_copy(value) if dataclasses.is_dataclass(value) else (
            [_deep_copy(v) for v in value] if isinstance(value, list) else
            dict(value) if isinstance(value, dict) else value)
    return type(config)(**values)


def _is_dataclass_path(config: Any, dotted: str) -> bool:
    node = config
    for part in [p for p in dotted.split(".") if p]:
        if not dataclasses.is_dataclass(node) or part not in {f.name for f in dataclasses.fields(node)}:
            return False
        node = getattr(node, part)
    return dataclasses.is_dataclass(node)


def _set_dotted(config: Any, dotted: str, raw: Any, where: str, parse_strings: bool) -> None:
    parts = dotted.split(".")
    node = config
    for depth, part in enumerate(parts):
        if not dataclasses.is_dataclass(node):
            raise ConfigError(f"{where}: {'.'.join(parts[:depth])} is not a section, cannot set {dotted}")
        names = {f.name: f for f in dataclasses.fields(node)}
        if part not in names:
            section = ".".join(parts[:depth]) or "the top level"
            raise ConfigError(f"{where}: unknown key {dotted!r} (known in {section}: {', '.join(sorted(names))})")
        if depth == len(parts) - 1:
            hint = typing.get_type_hints(type(node))[part]
            try:
                value = yaml.safe_load(raw) if parse_strings and isinstance(raw, str) else raw
            except yaml.YAMLError as error:
                raise ConfigError(f"{where}: {dotted}={raw!r} is not a valid YAML value "
                                  f"({' '.join(str(error).split())})") from None
            setattr(node, part, _coerce(value, hint, dotted, where))
        else:
            node = getattr(node, part)


def _coerce(value: Any, hint: Any, key: str, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if errors else f"{where}: bad value for {key}")
    if origin in (list, tuple, Sequence):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: {key} expects a list, got {value!r}")
        item_type = args[0] if args else Any
        return [_coerce(v, item_type, key, where) for v in value]
    if origin is dict or hint is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: {key} expects a mapping, got {value!r}")
        value_type = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, value_type, key, where) for k, v in value.items()}
    if hint is Any:
        return value
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):  # a list of sections (e.g. data.phases)
        if isinstance(value, hint):
            return _deep_copy(value)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: {key} expects a mapping of {hint.__name__} settings, got {value!r}")
        return from_dict(hint, value, where=f"{where}: {key}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: {key} expects true/false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: {key} expects an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML reads "1e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {key} expects a number, got {value!r}")
        return float(value)
    if hint is str:
        if value is None or isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: {key} expects a string, got {value!r}")
        return str(value)
    return value
