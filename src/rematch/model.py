"""ReMatchModel: a Qwen-VL backbone turned into a single-vector multimodal embedder.

Every input ends with K learnable tokens (one set for queries, one for documents);
their last-layer states e_1..e_K are averaged into the embedding (multi-token embedding
fusion). With K = 0 and pooling "last" the same code is plain last-token pooling, which
is how the VLM2Vec-style baseline shares this path. A projector maps an embedding back
to one soft input token for the generative matching branch, and the LM-head rows of
"Yes" and "No" score a match without computing the full vocabulary (the generative loss over
the whole vocabulary computes it at the answer positions only).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from rematch.backbones import adapter_for, load_backbone
from rematch.backbones.base import DeepStack, EncoderBatch
from rematch.config import ROLES, SAVED_BEFORE, ModelConfig
from rematch.data.items import Item, ItemLike, as_items
from rematch.devices import resolve_device
from rematch.hub.card import EvalTable
from rematch.hub.push import push_model
from rematch.instructions import document_items, with_resolved_table
from rematch.layers import EmbeddingProjector, init_learnable_tokens, ordinary_token_ids
from rematch.prefetch import Prefetcher
from rematch.serialization import (FINGERPRINT_SCHEME, ProcessorIdentity, load_rematch_model, save_rematch_model,
                                   weights_fingerprint)


@dataclass
class EmbeddingOutput:
    """What one embedding forward returns."""

    embedding: torch.Tensor
    """(B, H) float32, L2-normalised: what similarity is computed on."""
    fused: torch.Tensor
    """(B, H) float32, the fused vector before normalisation (mean of the K states, taken in float32)."""
    token_states: torch.Tensor
    """(B, K, H) the final states at the K learnable positions ((B, 1, H) for K = 0)."""


class ReMatchModel(nn.Module):
    """Backbone + K learnable tokens per role + fusion + projector.

    Build one with :meth:`tiny` (offline, random), :meth:`from_backbone` (a Qwen-VL
    checkpoint, fresh ReMatch parts) or :meth:`from_pretrained` (a saved ReMatch model).
    """

    fingerprint_scheme: int = FINGERPRINT_SCHEME
    """How :meth:`fingerprint` is made (``rematch.serialization.FINGERPRINT_SCHEME``): a model
    loaded from a directory saved before scheme 2 keeps scheme 1 (configuration and weights),
    so the indexes and caches made with it still match it."""

    heads_source: str | None = None
    """Where the learnable tokens and projector came from: the directory or hub id they were
    loaded from, or None when freshly initialised (tiny / from_config / from_backbone, or a
    saved model that was never trained, see :meth:`is_untrained`). Commands that embed
    refuse a model with None here unless told to allow it."""

    def __init__(self, backbone: nn.Module, processor, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = with_resolved_table(config)  # the saved model keeps the table it was trained with
        self.backbone = backbone
        model_type = self._causal_lm().config.model_type
        self.adapter = adapter_for(model_type)(processor, config)
        self.adapter.bind_backbone(self._causal_lm().config)
        # what besides weights and config decides a vector, as built (an evaluation's input limits
        # change the image processor for a while; the identity stays the model's own)
        self._processor_identity = ProcessorIdentity(processor, self._causal_lm().config)
        self.hidden_size = self.adapter.hidden_size(backbone)
        self.yes_token_id = self.adapter.token_id("Yes")
        self.no_token_id = self.adapter.token_id("No")
        embedding_weight = self.adapter.core(backbone).get_input_embeddings().weight
        ordinary = ordinary_token_ids(self.adapter.tokenizer, embedding_weight.shape[0])
        generator = torch.Generator().manual_seed(config.seed)
        k = config.num_tokens
        self.query_tokens = nn.Parameter(init_learnable_tokens(embedding_weight, k, generator, ordinary))
        self.document_tokens = nn.Parameter(init_learnable_tokens(embedding_weight, k, generator, ordinary))
        typical_norm = float(embedding_weight.detach().float().norm(dim=-1).median())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.projector = EmbeddingProjector(self.hidden_size, config.projector_layers, typical_norm,
                                                centering=config.projector_centering)
        self.to(embedding_weight.device)
        self.mark_untrained()

    # ------------------------------------------------------------------ construction

    @classmethod
    def tiny(cls, size: str = "tiny", backbone: str = "qwen2_vl", num_tokens: int = 16, seed: int = 0,
             pooling: str | None = None, device: str | torch.device = "cpu", pretrained: bool = False,
             **config_fields) -> "ReMatchModel":
        """An untrained ReMatch model on a randomly initialised offline backbone (no download).

        ``pretrained=True`` uses the shipped ``tiny-pretrained`` backbone instead (the tiny
        Qwen2-VL after generative pre-training on the shapes world; see docs/pretraining.md);
        ``size``, ``backbone`` and ``seed`` then no longer choose the backbone's weights.
        """
        config = ModelConfig(backbone="tiny-pretrained" if pretrained else "tiny", tiny_family=backbone,
                             tiny_size=size, num_tokens=num_tokens, seed=seed,
                             pooling=pooling or ("mean" if num_tokens else "last"),
                             **config_fields)
        return cls.from_config(config, device=device)

    @classmethod
    def from_config(cls, config: ModelConfig, device: str | torch.device = "cpu") -> "ReMatchModel":
        """A fresh ReMatch model on the backbone that ``config.backbone`` names."""
        config.validate()
        backbone, processor = load_backbone(config, device=device)
        return cls(backbone, processor, config)

    @classmethod
    def from_backbone(cls, name_or_path: str | os.PathLike, num_tokens: int = 16, pooling: str | None = None,
                      **config_fields) -> "ReMatchModel":
        """Fresh ReMatch parts on a Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint (hub id or local directory)."""
        config = ModelConfig(backbone=str(name_or_path), num_tokens=num_tokens,
                             pooling=pooling or ("mean" if num_tokens else "last"),
                             **config_fields)
        return cls.from_config(config)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device | None = None, *,
                        revision: str | None = None, new_heads: bool = False, **expected) -> "ReMatchModel":
        """Load a model written by :meth:`save_pretrained`: a local directory or a hub id.

        A hub id (``org/name``, optionally ``org/name@revision`` or ``revision=``) is resolved
        to its snapshot with ``huggingface_hub.snapshot_download`` (the local cache is used,
        and ``HF_HUB_OFFLINE=1`` is obeyed), then loaded exactly like a directory. Keyword
        arguments are expectations checked against the saved configuration (e.g.
        ``num_tokens=16``): a mismatch is an error, never a silent re-initialisation.

        A bare Qwen-VL checkpoint (no ``rematch_config.json``) is refused rather than given
        random heads; ``new_heads=True`` (or :meth:`from_backbone`) asks for fresh ones, with
        the keyword arguments as ModelConfig fields. ``device`` defaults to CUDA when available
        (:func:`rematch.devices.default_device`).
        """
        model = load_rematch_model(cls, path, expected, revision=revision, new_heads=new_heads)
        return model.to(resolve_device(device))

    @classmethod
    def load(cls, spec: str, device: str | torch.device | None = None) -> "ReMatchModel":
        """A model from a short spec: ``tiny``, ``tiny:small``, ``tiny:small:qwen2_5_vl`` (offline,
        untrained: ``heads_source`` is None), or a saved ReMatch directory or hub id
        (:meth:`from_pretrained`). ``device`` defaults to CUDA when available."""
        if spec == "tiny-pretrained":
            return cls.tiny(pretrained=True, device=resolve_device(device))
        if spec == "tiny" or spec.startswith("tiny:"):
            parts = spec.split(":")
            size = parts[1] if len(parts) > 1 and parts[1] else "tiny"
            family = parts[2] if len(parts) > 2 and parts[2] else "qwen2_vl"
            return cls.tiny(size=size, backbone=family, device=resolve_device(device))
        return cls.from_pretrained(spec, device=device)

    def save_pretrained(self, path: str | os.PathLike, overwrite: bool = False) -> None:
        """Write backbone (or PEFT adapter), processor, learnable tokens, projector and config, atomically.

        ``path`` must be new, empty or a saved ReMatch model holding only a saved model's files
        (which is replaced); anything else -- a folder of the user's, notes beside a model -- is
        refused, ``overwrite=True`` or not, so a wrong path never deletes a user's files.
        ``rematch_config.json`` records the checksums of the weight files, which loading checks.
        """
        save_rematch_model(self, Path(path), overwrite=overwrite)

    def push_to_hub(self, repo_id: str, private: bool = False, eval_table: EvalTable | None = None,
                    **options) -> str:
        """Save, write a model card for ``repo_id`` and upload; returns the repository URL.

        ``eval_table`` (``rematch.evaluation.report.read_eval_table(EVAL_DIR)``) puts scores on
        the card; see :func:`rematch.hub.push.push_model`."""
        return push_model(self, repo_id, private=private, eval_table=eval_table, **options)

    # ------------------------------------------------------------------ trained or not

    def mark_untrained(self) -> None:
        """Record the current weights as "never trained" (see :meth:`is_untrained`)."""
        self._untrained_versions = {id(p): (p, p._version) for p in self.parameters()}

    def is_untrained(self) -> bool:
        """Whether this model is exactly as freshly built: heads not loaded from a trained model
        (``heads_source`` is None) and no parameter changed in place since it was built.

        Every in-place update (an optimiser step, loading weights into it) bumps a tensor's
        version counter and LoRA adds new parameters, so this costs no hashing. ``save_pretrained``
        records it: a saved ``rematch tiny`` model is known as untrained when loaded again, and the
        commands that embed refuse it unless ``--allow-untrained`` (its heads are as random as ever).
        """
        if self.heads_source is not None:
            return False
        recorded = getattr(self, "_untrained_versions", {})
        return all(recorded.get(id(p), (None, -1))[1] == p._version for p in self.parameters())

    # ------------------------------------------------------------------ properties

    @property
    def num_tokens(self) -> int:
        return self.config.num_tokens

    @property
    def device(self) -> torch.device:
        return self.query_tokens.device

    @property
    def backbone_dtype(self) -> torch.dtype:
        return self.adapter.core(self.backbone).get_input_embeddings().weight.dtype

    @property
    def processor(self):
        return self.adapter.processor

    def _causal_lm(self) -> nn.Module:
        backbone = self.backbone
        return backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone

    def role_tokens(self, role: str) -> torch.Tensor:
        if role == "query":
            return self.query_tokens
        if role == "document":
            return self.document_tokens
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")

    # ------------------------------------------------------------------ embedding path

    def prepare(self, items: Sequence[ItemLike], role: str = "query", where: str = "item",
                indices: Sequence[int] | None = None) -> EncoderBatch:
        """Items -> a padded batch on the CPU (cheap to run in DataLoader workers).

        Documents without an instruction get the model's default document instruction
        (callers that know the subset apply its own first: see :mod:`rematch.instructions`).
        """
        return self.adapter.prepare(self._for_role(as_items(items, where), role), self.num_tokens, where=where,
                                    indices=indices)

    def _for_role(self, items: list[Item], role: str) -> list[Item]:
        self.role_tokens(role)  # validates the role
        return document_items(items, None, self.config) if role == "document" else items

    def embed(self, batch: EncoderBatch, role: str) -> EmbeddingOutput:
        """One differentiable embedding forward."""
        batch = batch.to(self.device, non_blocking=True)  # asynchronous only from pinned memory
        embeds, deepstack = self.adapter.embed_inputs(self.backbone, batch.input_ids, batch.pixel_values,
                                                      batch.image_grid_thw, image_features=batch.image_features,
                                                      **batch.video_inputs())
        k = batch.num_tokens
        if k != self.num_tokens:
            raise ValueError(f"batch was prepared with {k} slots but the model has K={self.num_tokens}")
        if k:
            tokens = self.role_tokens(role).to(embeds.dtype).unsqueeze(0).expand(embeds.shape[0], -1, -1)
            embeds = torch.cat([embeds[:, :-k], tokens], dim=1)
        if self.config.padding_free:
            states = self._packed_states(embeds, batch, max(k, 1), deepstack)
        else:
            hidden = self.adapter.language_model(self.backbone, embeds, batch.attention_mask, batch.position_ids,
                                                 deepstack=deepstack)
            states = hidden[:, -k:] if k else hidden[:, -1:]
        # Pool in float32 whatever the compute dtype: a bf16 mean of 16 states rounds each
        # partial sum to 8 bits of mantissa, enough to move near-tied neighbours in a ranking.
        fused = states.float().mean(dim=1) if self.config.pooling == "mean" else states[:, -1].float()
        embedding = F.normalize(fused, dim=-1)
        return EmbeddingOutput(embedding=embedding, fused=fused, token_states=states)

    def _packed_states(self, embeds: torch.Tensor, batch: EncoderBatch, last: int,
                       deepstack: DeepStack | None = None) -> torch.Tensor:
        """Padding-free forward: the rows' real tokens packed into one sequence; (B, last, H) final states.

        Each item keeps its own M-RoPE ids (they start at 0 per item, as in the padded
        batch) and attends only to itself (block-diagonal causal attention, see
        :meth:`~rematch.backbones.qwen_vl.QwenVLAdapter.packed_language_model`), so its states
        are the padded path's. Left padding puts each row's slots at the end of its tokens.
        """
        valid = batch.attention_mask.bool()
        lengths = valid.sum(dim=1)
        packed = embeds[valid].unsqueeze(0)  # row-major: each row's tokens stay together, in order
        positions = batch.position_ids[:, valid].unsqueeze(1)
        deepstack = deepstack.packed(valid) if deepstack is not None else None
        hidden = self.adapter.packed_language_model(self.backbone, packed, positions, lengths, deepstack)[0]
        ends = lengths.cumsum(dim=0)
        index = ends[:, None] - last + torch.arange(last, device=ends.device)[None, :]
        return hidden[index]

    def forward(self, batch: EncoderBatch, role: str = "query") -> EmbeddingOutput:
        return self.embed(batch, role)

    @torch.inference_mode()
    def encode(self, items: Iterable[ItemLike], role: str = "query", batch_size: int = 16,
               show_progress: bool = False, normalize: bool = True, where: str = "item",
               prefetch: int | None = None) -> np.ndarray:
        """Embed items -> float32 array (n, H), rows L2-normalised unless ``normalize=False``.

        Items are sorted by length internally so batches carry little padding; rows come
        back in input order. Errors name ``where`` and the item's position (e.g.
        ``where="corpus.jsonl row"`` gives "corpus.jsonl row 4312: ..."). Up to ``prefetch``
        batches are prepared (images decoded, tokenised; pinned when the model is on a GPU)
        in a background thread while the model runs (:mod:`rematch.prefetch`; 0: in line).
        The default, None, is 2 on a GPU and 0 on a CPU, where the preparation competes with
        the forward for the same cores (benchmarks/RESULTS.md: 0.82x on a 2-core VM).
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if prefetch is None:
            prefetch = 2 if self.device.type == "cuda" else 0
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
            raise ValueError(f"prefetch must be an integer >= 0 or None, got {prefetch!r}")
        items = self._for_role(as_items(list(items), where), role)
        output = np.zeros((len(items), self.hidden_size), dtype=np.float32)
        if not items:
            return output
        order = sorted(range(len(items)), key=lambda i: -self.adapter.estimate_length(items[i]))
        was_training = self.training
        self.eval()
        pin = self.device.type == "cuda"

        def prepare(indices: list[int]) -> EncoderBatch:
            batch = self.adapter.prepare([items[i] for i in indices], self.num_tokens, where=where, indices=indices)
            return batch.pin_memory() if pin else batch

        try:
            batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
            with Prefetcher(prepare, batches, depth=prefetch) as prepared, \
                    tqdm(total=len(batches), disable=not show_progress, desc=f"encode {'queries' if role == 'query' else 'documents'}", unit="batch") as bar:
                for indices, batch in prepared:
                    self._encode_batch(batch, indices, role, normalize, output)
                    bar.update(1)
        finally:
            self.train(was_training)
        return output

    def _encode_batch(self, batch: EncoderBatch, indices: list[int], role: str, normalize: bool,
                      output: np.ndarray) -> None:
        """One prepared batch of :meth:`encode` into its rows of ``output``."""
        result = self.embed(batch, role)
        vectors = result.embedding if normalize else result.fused.float()
        if not torch.isfinite(vectors).all():
            raise FloatingPointError(f"non-finite embedding for item(s) {indices}")
        norms = vectors.norm(dim=-1)
        if normalize and not torch.allclose(norms, torch.ones_like(norms), atol=1e-3):
            raise FloatingPointError(f"embedding of item(s) {indices} is not unit length (a zero vector?)")
        output[indices] = vectors.cpu().numpy()

    # ------------------------------------------------------------------ matching pieces

    def project(self, embedding: torch.Tensor) -> torch.Tensor:
        """Embeddings (B, H) -> soft input tokens (B, H) in the backbone's dtype."""
        return self.projector(embedding.float()).to(self.backbone_dtype)

    def answer_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, H) final states -> (N, 2) logits of ["Yes", "No"] from just those two LM-head rows."""
        rows = self.adapter.output_rows(self.backbone, [self.yes_token_id, self.no_token_id])
        return hidden.to(rows.dtype) @ rows.T

    def vocabulary_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, H) final states -> (N, V) logits over the whole vocabulary, through the causal
        LM's own output layer (what its forward applies at every position; here only at the N
        given states): the generative matching loss, ``loss.matching_vocabulary: full``."""
        head = self.adapter.causal_lm(self.backbone).get_output_embeddings()
        return head(hidden.to(head.weight.dtype))

    # ------------------------------------------------------------------ fine-tuning helpers

    def enable_lora(self, r: int = 32, alpha: int = 64, dropout: float = 0.05, use_dora: bool = False,
                    target_modules: str | Sequence[str] | None = None) -> None:
        """Wrap the language model's linear layers with PEFT LoRA/DoRA adapters.

        The vision tower and the base weights freeze; the learnable tokens and the
        projector stay trainable (they are not part of the backbone).
        """
        from peft import LoraConfig, get_peft_model

        if hasattr(self.backbone, "peft_config"):
            raise RuntimeError("LoRA is already enabled on this model")
        target = target_modules or (r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)")
        lora = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, use_dora=use_dora,
                          target_modules=target, bias="none")
        self.backbone = get_peft_model(self.backbone, lora)

    def fingerprint(self) -> str:
        """A short identity of everything that decides this model's vectors: its configuration
        (the instruction table included), its current weights (every byte), and -- scheme 2 --
        its processor (``preprocessor_config.json``, the tokenizer files) and backbone
        configuration (:class:`rematch.serialization.ProcessorIdentity`).

        Indexes and embedding caches store it, so vectors from one model are never mixed
        with (or searched by) another. The hash is cached until a weight changes: every
        in-place update bumps a tensor's version counter, and a replaced tensor has another
        address, so the cache key (name, address, version) of each tensor sees both.
        """
        import dataclasses
        import hashlib

        state = self.state_dict(keep_vars=True)
        # padding_free changes how a batch is laid out, not the vectors: it is no part of the identity.
        # Fields that came later (the video settings, the target prompt style) join it only when set
        # away from the value models saved before them behave as (config.SAVED_BEFORE), so the
        # fingerprints stored in existing indexes and caches still match their models.
        identity = {k: v for k, v in dataclasses.asdict(self.config).items()
                    if k != "padding_free" and not (k in SAVED_BEFORE and v == SAVED_BEFORE[k])}
        key = tuple((name, tensor.data_ptr(), tensor._version) for name, tensor in state.items())
        cached = getattr(self, "_fingerprint_cache", None)
        if cached is None or cached[0] != key:
            self._fingerprint_cache = (key, weights_fingerprint(state))
        weights = self._fingerprint_cache[1]
        config = repr(sorted(identity.items()))
        text = f"{config}|{weights}"
        if self.fingerprint_scheme >= 2:
            text += f"|{self._processor_identity.digest()}"
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    def merge_lora(self) -> "ReMatchModel":
        """Fold the LoRA/DoRA adapters into the backbone weights (a standalone model, no PEFT needed)."""
        if not hasattr(self.backbone, "peft_config"):
            raise ValueError("this model has no LoRA adapters to merge (it was trained without LoRA, or "
                             "they were merged already)")
        self.backbone = self.backbone.merge_and_unload()
        return self
