"""GradCache: the gradient of a large contrastive batch with the memory of a small chunk.

The contrastive loss couples every query with every document of the (global) batch, so
its gradient normally needs all activations at once. GradCache (Gao et al., 2021) splits
the work:

1. embed the batch chunk by chunk without building a graph, keeping only the
   representations (the normalised embeddings and the K token states) and each chunk's
   RNG state;
2. compute the losses on those representations as leaf tensors and backpropagate to
   get d loss / d representation (cheap: no backbone activations);
3. re-embed each chunk with a graph, under the same RNG state, and backpropagate the
   cached representation gradients through it (sum of representation x gradient).

How the matching branch composes with it: in step 2 the matching forward runs for real
(on ``loss.matching_samples`` samples, with a graph), fed with the *leaf* embeddings. Its
backward therefore gives the parameter gradients of the packed matching sequence directly
and adds d L_qdm / d embedding to the cached gradients, which step 3 carries into the
embedding forward. The result is the exact gradient of the full loss; the memory cost is
one embedding chunk plus one matching sub-batch.

Multi-process: every backward runs outside DDP's hooks, and the gradients are averaged
across processes once at the end of the step, in a few flat buckets (the objective is
already scaled so that this average is the single-process gradient of the global batch,
whatever the per-rank row counts: see :mod:`rematch.losses`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from rematch.backbones.base import EncoderBatch
from rematch.losses import OBJECTIVE, objective
from rematch.model import EmbeddingOutput
from rematch.training.step import ReMatchTrainingModule


class _ChunkRng:
    """Snapshot and restore the CPU (and current CUDA device) RNG, so a re-forward repeats dropout."""

    def __init__(self, device: torch.device):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.device = device

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def _chunks(batch: EncoderBatch, size: int) -> list[EncoderBatch]:
    return [batch.rows(start, min(start + size, len(batch))) for start in range(0, len(batch), size)]


class GradCache:
    """Runs one GradCache training step on a :class:`ReMatchTrainingModule` (see module docstring)."""

    def __init__(self, module: ReMatchTrainingModule, chunk_size: int):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.module = module
        self.chunk_size = chunk_size

    def step(self, batch, step: int = 0) -> dict[str, torch.Tensor]:
        """Forward + backward of the whole batch; leaves the gradients in ``.grad``; returns the (detached) losses."""
        model = self.module.model
        batch = self.module.prepare_batch(batch)  # frozen tower: image features once, for all three passes
        sides = [("query", batch.queries), ("document", batch.positives)]
        if batch.negatives is not None and self.module.loss_config.hard_negatives:
            sides.append(("document", batch.negatives))
        cached = [self._embed_without_graph(encoder_batch, role) for role, encoder_batch in sides]
        leaves = [EmbeddingOutput(embedding=torch.cat([c[0] for c in chunks]).requires_grad_(True),
                                  fused=torch.empty(0),
                                  token_states=torch.cat([c[1] for c in chunks]).requires_grad_(True))
                  for chunks, _ in cached]
        queries, positives = leaves[0], leaves[1]
        negatives = leaves[2] if len(leaves) == 3 else None
        terms = self.module.losses(batch, queries, positives, negatives, step)
        objective(terms).backward()
        for (chunks, rng_states), (role, encoder_batch), leaf in zip(cached, sides, leaves):
            start = 0
            for chunk, rng in zip(_chunks(encoder_batch, self.chunk_size), rng_states):
                rng.restore()
                output = model.embed(chunk, role)
                stop = start + len(chunk)
                surrogate = (output.embedding * leaf.embedding.grad[start:stop]).sum()
                if leaf.token_states.grad is not None:
                    surrogate = surrogate + (output.token_states.float()
                                             * leaf.token_states.grad[start:stop].float()).sum()
                surrogate.backward()
                start = stop
        average_gradients_across_processes(self.module)
        return {name: value.detach() for name, value in terms.items() if name != OBJECTIVE}

    @torch.no_grad()
    def _embed_without_graph(self, encoder_batch: EncoderBatch, role: str):
        model = self.module.model
        outputs, rng_states = [], []
        for chunk in _chunks(encoder_batch, self.chunk_size):
            rng_states.append(_ChunkRng(model.device))
            result = model.embed(chunk, role)
            outputs.append((result.embedding, result.token_states))
        return outputs, rng_states


BUCKET_BYTES = 64 * 1024 * 1024
"""Gradients are all-reduced in flat buffers of about this size: a few large messages
instead of one per parameter, with bounded extra memory (DDP buckets for the same reason)."""


def average_gradients_across_processes(module: torch.nn.Module, bucket_bytes: int = BUCKET_BYTES) -> None:
    """Average ``.grad`` over processes (what DDP's hooks do, done once after several backwards).

    Every trainable parameter takes part on every rank (a missing gradient counts as zeros),
    so all ranks make the same calls with the same buffer sizes. Gradients are grouped by
    device and dtype and flattened into buckets of about ``bucket_bytes``.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for parameter in module.parameters():
        if parameter.requires_grad:
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
            groups.setdefault((parameter.grad.device, parameter.grad.dtype), []).append(parameter.grad)
    for grads in groups.values():
        for bucket in _buckets(grads, bucket_bytes):
            flat = _flatten_dense_tensors(bucket)
            dist.all_reduce(flat)
            flat /= world
            for grad, averaged in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                grad.copy_(averaged)


def _buckets(tensors: list[torch.Tensor], bucket_bytes: int) -> list[list[torch.Tensor]]:
    """Consecutive runs of tensors of at most ``bucket_bytes`` each (a larger tensor gets its own)."""
    buckets: list[list[torch.Tensor]] = []
    size = 0
    for tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if not buckets or size + nbytes > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append(tensor)
        size += nbytes
    return buckets
