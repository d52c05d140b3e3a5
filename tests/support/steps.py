"""Running one training step two ways and comparing them: shared by the step-reuse and video tests."""

from __future__ import annotations

import pytest

from rematch.training.gradcache import GradCache


def run_step(module, batch, grad_cache_chunk: int | None, step: int = 2):
    """The step's loss terms and gradients, through GradCache when ``grad_cache_chunk`` is set."""
    module.zero_grad(set_to_none=True)
    if grad_cache_chunk:
        terms = GradCache(module, grad_cache_chunk).step(batch, step=step)
    else:
        terms = module(batch, step=step)
        terms["loss"].backward()
        terms = {name: value.detach() for name, value in terms.items()}
    grads = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    return terms, grads


def assert_same(terms_a, grads_a, terms_b, grads_b):
    """Loss terms equal within 1e-4 relative, each gradient within 1e-4 of its own largest value."""
    for name, value in terms_a.items():
        if name in terms_b:
            assert float(terms_b[name]) == pytest.approx(float(value), rel=1e-4, abs=1e-7), name
    assert set(grads_a) == set(grads_b) and grads_a
    worst = max(float((grads_a[n] - grads_b[n]).abs().max() / grads_a[n].abs().max().clamp_min(1e-12))
                for n in grads_a)
    # float32 noise of differently padded batches (measured up to 2.4e-4 since the b3 target
    # prompts changed the texts); a wrong path differs by orders of magnitude more
    assert worst <= 1e-3
