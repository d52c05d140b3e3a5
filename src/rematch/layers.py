"""The small trainable pieces ReMatch adds to a backbone.

* learnable embedding tokens (K x hidden per role), initialised from real vocabulary rows
  so they start inside the distribution the language model was trained on;
* the projector that maps a fused embedding back to ONE soft input token, which is how
  the matching branch lets the LLM "read" an embedding (and pushes gradients into it).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def ordinary_token_ids(tokenizer, num_rows: int) -> list[int]:
    """Ids of the tokenizer's learned vocabulary: no special or added tokens, and none of the
    padding rows that checkpoints append to the embedding table (Qwen2-VL has 151,936 rows for
    151,643 learned tokens). Those rows were never trained, so a copy of one is no start for a
    learnable token."""
    excluded = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    return [i for i in range(min(tokenizer.vocab_size, num_rows)) if i not in excluded]


def init_learnable_tokens(embedding_weight: torch.Tensor, num_tokens: int, generator: torch.Generator,
                          candidate_ids: list[int]) -> torch.Tensor:
    """``num_tokens`` distinct rows of the embedding table among ``candidate_ids`` (fp32 copies),
    chosen by ``generator``."""
    hidden = embedding_weight.shape[1]
    if num_tokens == 0:
        return torch.zeros(0, hidden)
    if len(candidate_ids) < num_tokens:
        raise ValueError(f"{num_tokens} learnable tokens need as many distinct vocabulary rows; only "
                         f"{len(candidate_ids)} ordinary tokens exist")
    candidates = torch.tensor(candidate_ids)
    chosen = candidates[torch.randperm(len(candidates), generator=generator)[:num_tokens]]
    return embedding_weight.detach()[chosen.to(embedding_weight.device)].float().cpu().clone()


class EmbeddingProjector(nn.Module):
    """MLP from an L2-normalised embedding to one soft input token of the LLM.

    The output is rescaled to a learnable norm initialised at the typical norm of the
    backbone's token embeddings, so the soft token enters the LLM at the scale of a real
    token from the first step instead of as a vanishing or exploding input.
    """

    def __init__(self, hidden_size: int, num_layers: int = 2, output_norm: float = 1.0):
        super().__init__()
        layers: list[nn.Module] = []
        for index in range(num_layers):
            layers.append(nn.Linear(hidden_size, hidden_size))
            if index < num_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.output_norm = nn.Parameter(torch.tensor(float(output_norm)))

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        hidden = self.mlp(embedding)
        return F.normalize(hidden, dim=-1, eps=1e-6) * self.output_norm
