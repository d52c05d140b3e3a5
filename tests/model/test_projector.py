"""The projector keeps what tells items apart: zero biases at init and a running-mean centre.

Issue 24: with PyTorch's default biases every item's soft token came out nearly the same
(mean pairwise cosine 0.977 for documents at 0.67), and with the shared direction that
trained embeddings have, the matching head could not learn to compare two soft views.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from rematch import ReMatchModel
from rematch.layers import EmbeddingProjector
from tests.support.saved_models import save_as_before

HIDDEN = 128


def mean_pairwise_cosine(vectors: torch.Tensor) -> float:
    unit = F.normalize(vectors.float(), dim=-1)
    similarity = unit @ unit.T
    count = len(unit)
    return float((similarity.sum() - similarity.diagonal().sum()) / (count * count - count))


def anisotropic_embeddings(count: int, shared_cosine: float, seed: int = 0) -> torch.Tensor:
    """Unit vectors sharing one direction (the same for every seed), as trained embeddings do
    (mean pairwise cosine ~``shared_cosine``); ``seed`` draws their own parts."""
    common = F.normalize(torch.randn(1, HIDDEN, generator=torch.Generator().manual_seed(12345)), dim=-1)
    own = F.normalize(torch.randn(count, HIDDEN, generator=torch.Generator().manual_seed(seed)), dim=-1)
    return F.normalize(shared_cosine ** 0.5 * common + (1 - shared_cosine) ** 0.5 * own, dim=-1)


def test_a_fresh_projector_keeps_items_as_distinct_as_their_embeddings():
    torch.manual_seed(0)
    projector = EmbeddingProjector(HIDDEN, num_layers=2).eval()
    embeddings = anisotropic_embeddings(200, 0.6)
    with torch.no_grad():
        soft = projector(embeddings)
    # default (uniform) biases made 0.6 -> ~0.95: the head could not tell one soft token from another
    assert mean_pairwise_cosine(soft) < mean_pairwise_cosine(embeddings) + 0.1
    assert all(not layer.bias.detach().any() for layer in projector.mlp if isinstance(layer, torch.nn.Linear))


def test_centering_removes_the_shared_direction_and_tracks_the_running_mean():
    torch.manual_seed(0)
    projector = EmbeddingProjector(HIDDEN, num_layers=2, centering=True, momentum=0.5)
    first, second = anisotropic_embeddings(64, 0.8, seed=1), anisotropic_embeddings(64, 0.8, seed=2)
    projector.observe(first)  # the first batch sets the centre outright
    torch.testing.assert_close(projector.center, first.mean(dim=0))
    projector.observe(second)  # later ones move it by `momentum`
    torch.testing.assert_close(projector.center, 0.5 * first.mean(dim=0) + 0.5 * second.mean(dim=0))
    projector.observe(second[:1])  # one embedding is no estimate of a mean: the centre stays
    assert float(projector.center_updates) == 2.0
    with torch.no_grad():
        soft = projector(anisotropic_embeddings(200, 0.8, seed=1))
    assert mean_pairwise_cosine(soft) < 0.2  # the embeddings themselves: ~0.8
    centre = projector.center.clone()
    for mode in (True, False):  # a forward never moves it, in training or inference
        projector.train(mode)
        first_call, second_call = projector(second), projector(second)
        torch.testing.assert_close(first_call, second_call)
    torch.testing.assert_close(projector.center, centre)


def test_the_centre_is_saved_with_the_heads_and_reloaded(tmp_path):
    model = ReMatchModel.tiny(num_tokens=2)
    assert model.config.projector_centering
    model.projector.observe(anisotropic_embeddings(16, 0.8)[:, :model.hidden_size])
    model.eval()
    model.save_pretrained(tmp_path / "m")
    loaded = ReMatchModel.from_pretrained(tmp_path / "m").eval()
    torch.testing.assert_close(loaded.projector.center, model.projector.center)
    probe = anisotropic_embeddings(4, 0.8, seed=3)[:, :model.hidden_size]
    torch.testing.assert_close(loaded.project(probe), model.project(probe))


def test_a_model_saved_before_centering_loads_without_it(tmp_path):
    old = ReMatchModel.tiny(num_tokens=2, projector_centering=False)
    loaded = ReMatchModel.from_pretrained(save_as_before(old, tmp_path / "old", "projector_centering"))
    assert not loaded.config.projector_centering and not hasattr(loaded.projector, "center")
    assert loaded.fingerprint() == old.fingerprint()  # its indexes and caches still match it
