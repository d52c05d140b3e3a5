"""encode's prefetching loader: same vectors in the same order, errors that name the item, no thread left."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from rematch.data.items import Item, ItemError
from rematch.prefetch import Prefetcher


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("rematch-prefetch")]


@pytest.fixture()
def mixed_items(tmp_path, shape_images) -> list[Item]:
    items = []
    for index in range(11):
        if index % 3 == 0:
            items.append(Item(text="a caption" + " and more" * index))
            continue
        path = tmp_path / f"{index}.png"
        shape_images[index % len(shape_images)].save(path)
        items.append(Item(image=str(path), text=None if index % 3 == 1 else f"picture {index}"))
    return items


def test_prefetched_encode_gives_the_same_vectors_in_the_same_order(tiny_model, mixed_items):
    inline = tiny_model.encode(mixed_items, batch_size=3, prefetch=0)
    prefetched = tiny_model.encode(mixed_items, batch_size=3, prefetch=2)
    cosine = (inline * prefetched).sum(axis=1)
    assert np.all(cosine >= 0.9999)
    np.testing.assert_allclose(prefetched, inline, rtol=1e-5, atol=1e-6)
    assert prefetch_threads() == []


def test_a_bad_item_is_still_named_and_no_thread_is_left(tiny_model, mixed_items, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png at all")
    items = mixed_items[:7] + [Item(image=str(broken))] + mixed_items[7:]
    with pytest.raises(ItemError, match=r"corpus row 7\b"):
        tiny_model.encode(items, batch_size=2, where="corpus row", prefetch=2)
    assert prefetch_threads() == []


def test_an_error_in_the_consumer_stops_the_thread():
    started = []

    def prepare(task: int) -> int:
        started.append(task)
        return task * 10

    with pytest.raises(RuntimeError, match="consumer failed"):
        with Prefetcher(prepare, range(100), depth=2) as results:
            for task, result in results:
                assert result == task * 10
                if task == 3:
                    raise RuntimeError("consumer failed")
    assert prefetch_threads() == []
    assert len(started) <= 3 + 1 + 2  # only the batches already requested ahead ran


def test_results_keep_task_order_and_depth_zero_uses_no_thread():
    before = threading.active_count()
    with Prefetcher(lambda task: -task, range(7), depth=0) as results:
        assert [r for _, r in results] == [-t for t in range(7)]
        assert threading.active_count() == before
    with Prefetcher(lambda task: -task, range(7), depth=3) as results:
        assert [(t, r) for t, r in results] == [(t, -t) for t in range(7)]
    assert prefetch_threads() == []
    with pytest.raises(ValueError, match="depth"):
        Prefetcher(abs, [], depth=-1)
