"""Shared fixtures: tiny real models (random weights, real architectures) and test images.

Every test runs inside :func:`no_leaked_global_state`: a test that changes process-wide
state (torch's thread count or default dtype, environment variables, the working
directory, a torch.distributed process group, accelerate's shared state) fails with a
message naming what it leaked, and the state is put back so the next test is unaffected.
Random-number state is restored silently (seeding inside a test is normal); the suite
runs in random order (pytest-randomly), which is what exposes order dependencies.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image

from rematch import ReMatchModel
from rematch.world.scenes import Scene, ShapeObject, render

torch.set_num_threads(2)


def _accelerate_state_initialised() -> bool:
    from accelerate.state import AcceleratorState, PartialState

    return bool(PartialState._shared_state) or bool(AcceleratorState._shared_state)


#: Set by pytest itself around every test phase.
_PYTEST_ENV = {"PYTEST_CURRENT_TEST"}


def _environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in _PYTEST_ENV}


@pytest.fixture(autouse=True)
def no_leaked_global_state():
    threads, dtype, env, cwd = torch.get_num_threads(), torch.get_default_dtype(), _environment(), os.getcwd()
    rng = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    yield
    leaks = []
    if torch.get_num_threads() != threads:
        leaks.append(f"torch threads {threads} -> {torch.get_num_threads()}")
        torch.set_num_threads(threads)
    if torch.get_default_dtype() != dtype:
        leaks.append(f"default dtype {dtype} -> {torch.get_default_dtype()}")
        torch.set_default_dtype(dtype)
    if _environment() != env:
        changed = sorted(set(_environment().items()) ^ set(env.items()))
        leaks.append(f"environment variables {sorted({k for k, _ in changed})}")
        for key in set(_environment()) - set(env):
            del os.environ[key]
        os.environ.update(env)
    if os.getcwd() != cwd:
        leaks.append(f"working directory {cwd} -> {os.getcwd()}")
        os.chdir(cwd)
    if dist.is_available() and dist.is_initialized():
        leaks.append("a torch.distributed process group")
        dist.destroy_process_group()
    if _accelerate_state_initialised():
        # train() builds an Accelerator; its shared state must not configure the next test's.
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    torch.set_rng_state(rng[0])
    np.random.set_state(rng[1])
    random.setstate(rng[2])
    assert not leaks, f"this test leaked global state: {'; '.join(leaks)}"


@pytest.fixture(scope="session")
def tiny_model() -> ReMatchModel:
    return ReMatchModel.tiny(size="tiny", backbone="qwen2_vl", num_tokens=16, seed=0)


@pytest.fixture(scope="session")
def tiny_model_25() -> ReMatchModel:
    return ReMatchModel.tiny(size="tiny", backbone="qwen2_5_vl", num_tokens=16, seed=0)


@pytest.fixture(scope="session")
def shape_images() -> list[Image.Image]:
    scenes = [
        Scene((ShapeObject("red", "circle", "large", 0.5, 0.5),)),
        Scene((ShapeObject("blue", "star", "small", 0.3, 0.5), ShapeObject("green", "square", "large", 0.7, 0.5))),
        Scene((ShapeObject("yellow", "triangle", "large", 0.5, 0.3),)),
    ]
    return [render(scene) for scene in scenes]


@pytest.fixture()
def image_files(tmp_path, shape_images) -> dict[str, str]:
    """The same picture saved in the awkward modes real corpora contain."""
    base = shape_images[1]
    paths = {}
    paths["rgb"] = tmp_path / "rgb.png"
    base.save(paths["rgb"])
    paths["gray"] = tmp_path / "gray.png"
    base.convert("L").save(paths["gray"])
    paths["rgba"] = tmp_path / "rgba.png"
    base.convert("RGBA").save(paths["rgba"])
    paths["palette"] = tmp_path / "palette.png"
    base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(paths["palette"])
    paths["gray16"] = tmp_path / "gray16.png"
    values = (np.asarray(base.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(values).save(paths["gray16"])
    paths["jpeg"] = tmp_path / "photo.jpg"
    base.save(paths["jpeg"], quality=90)
    paths["corrupt"] = tmp_path / "corrupt.png"
    paths["corrupt"].write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    return {name: str(path) for name, path in paths.items()}


@pytest.fixture()
def cli_error(capsys):
    """Run ``rematch ARGV`` in this process; assert it failed as a user error (exit 1, one line
    ``rematch: error: ...``, no traceback) and return that line."""
    from rematch.cli import main

    def run(argv) -> str:
        capsys.readouterr()
        status = main([str(arg) for arg in argv])
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert status == 1 and lines and lines[-1].startswith("rematch: error: "), (status, lines)
        return lines[-1]

    return run
