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

from rematch.distributed import all_reduce_sum


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

    Two choices keep what tells items apart visible to the language model (measured in
    docs/pretraining.md, "Issue 24: what the soft views can read"):

    * **Centering** (``centering=True``, new models): trained embeddings share one large
      direction (mean pairwise cosine 0.67-0.98 over the shapes world's documents), and the
      matching head then cannot learn to compare two of them: the packed matching branch
      learns to tell whether two of 256 soft identities are the same to AUC 0.85 in 400
      steps when they are isotropic, and stays at exactly ln 2 when they share a direction
      of cosine 0.8 (``scripts/probe_matching_learnability.py --shared-cosine``). The
      projector therefore subtracts the running mean of the training batches' embeddings
      (``center``: :meth:`observe`, an exponential moving average with ``momentum``, saved
      with the heads and used as is at inference) and renormalises before its MLP.
    * **Zero biases at init.** PyTorch's default biases add a constant as large as the
      embedding's own contribution at every layer: 600 documents at mean cosine 0.67 became
      soft tokens at 0.977, and the head's Yes/No margin moved by ~1e-5 between the soft
      views of one query's documents (1e-2 between their raw views).
    """

    def __init__(self, hidden_size: int, num_layers: int = 2, output_norm: float = 1.0, centering: bool = False,
                 momentum: float = 0.05):
        super().__init__()
        layers: list[nn.Module] = []
        for index in range(num_layers):
            layers.append(nn.Linear(hidden_size, hidden_size))
            if index < num_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.zeros_(layer.bias)
        self.output_norm = nn.Parameter(torch.tensor(float(output_norm)))
        self.centering = centering
        self.momentum = momentum
        if centering:
            self.register_buffer("center", torch.zeros(hidden_size))
            self.register_buffer("center_updates", torch.zeros(()))  # float: heads are saved as floats

    @torch.no_grad()
    def observe(self, embeddings: torch.Tensor) -> None:
        """Move the running mean towards these embeddings' mean (the first call sets it outright).

        The training step calls it once per step with every embedding of its batch (queries,
        positives, negatives), so the centre is estimated from the whole batch, not only the
        few samples that go through matching; :meth:`forward` never changes it, so two calls
        with the same input give the same soft tokens in training as in inference. Under
        torchrun every rank calls it and the mean is taken over the global batch (a sum and a
        count reduced over the ranks), so the centre is the one a single process would have.
        A single embedding is no estimate of a mean (it would centre itself to zero): ignored.
        """
        if not self.centering:
            return
        totals = torch.cat([embeddings.detach().float().sum(dim=0),
                            torch.tensor([float(embeddings.shape[0])], device=embeddings.device)])
        all_reduce_sum(totals)
        count = float(totals[-1])
        if count < 2:
            return
        weight = torch.where(self.center_updates == 0, 1.0, self.momentum).to(self.center.dtype)
        self.center.lerp_((totals[:-1] / count).to(self.center.device, self.center.dtype), weight)
        self.center_updates += 1

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        if self.centering:
            embedding = F.normalize(embedding - self.center.to(embedding.dtype), dim=-1, eps=1e-6)
        hidden = self.mlp(embedding)
        return F.normalize(hidden, dim=-1, eps=1e-6) * self.output_norm
