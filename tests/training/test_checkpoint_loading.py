"""A checkpoint is data, never code: a pickled payload in any file a resume reads does not run."""

from __future__ import annotations

import json
import pickle
import random

import numpy as np
import pytest
import torch

from rematch.training.checkpoint import MANIFEST, UnsafeCheckpointError, load_checkpoint, rng_state, save_checkpoint


class _Payload:
    """Unpickling this runs ``open(marker, "w")``: what an attacker's rng.pt would do."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _tiny_run():
    module = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    module(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    scheduler.step()
    return module, optimizer, scheduler


def test_rng_states_round_trip_through_a_checkpoint(tmp_path):
    module, optimizer, scheduler = _tiny_run()
    random.seed(5), np.random.seed(6), torch.manual_seed(7)
    directory = save_checkpoint(tmp_path, 1, module, optimizer, scheduler, {}, [rng_state()])
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    load_checkpoint(directory, module, optimizer, scheduler)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng.pt"])
def test_a_pickled_payload_in_a_checkpoint_file_does_not_run(tmp_path, name):
    module, optimizer, scheduler = _tiny_run()
    directory = save_checkpoint(tmp_path / "checkpoints", 1, module, optimizer, scheduler, {}, [rng_state()])
    marker = tmp_path / "payload-ran"
    target = directory / name
    with open(target, "wb") as handle:
        pickle.dump({"state": _Payload(str(marker))}, handle)
    manifest = json.loads((directory / MANIFEST).read_text())
    manifest["files"][name] = target.stat().st_size  # a careful attacker fixes the manifest too
    manifest.pop("checksums")  # (its checksums as well: the unpickling guard must hold on its own)
    (directory / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UnsafeCheckpointError, match=name):
        load_checkpoint(directory, module, optimizer, scheduler)
    assert not marker.exists()
