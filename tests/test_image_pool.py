"""ImagePool: the CycleGAN / Shrivastava et al. history buffer."""

from __future__ import annotations

import io

import pytest
import torch

from medgen.utils.image_pool import ImagePool


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _batch(start: int, n: int) -> torch.Tensor:
    """Images whose every pixel holds their id, so a returned image can be identified."""
    return torch.arange(start, start + n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 4, 4)


def _ids(batch: torch.Tensor) -> list[int]:
    return [int(image[0, 0, 0]) for image in batch]


def test_size_zero_is_passthrough():
    pool = ImagePool(0)
    x = torch.rand(3, 1, 4, 4, requires_grad=True)
    assert pool.query(x) is x
    assert len(pool) == 0


def test_fills_first_and_returns_inputs():
    pool = ImagePool(5, generator=torch.Generator().manual_seed(0))
    out = pool.query(_batch(0, 3))
    assert _ids(out) == [0, 1, 2] and len(pool) == 3
    out = pool.query(_batch(3, 2))
    assert _ids(out) == [3, 4] and len(pool) == 5
    assert [_ids(image[None])[0] for image in pool.images] == [0, 1, 2, 3, 4]


def test_full_pool_swaps_half_and_returns_what_was_stored():
    pool = ImagePool(10, generator=torch.Generator().manual_seed(1))
    pool.query(_batch(0, 10))
    next_id, swapped, total = 10, 0, 0
    for _ in range(400):
        before = [int(image[0, 0, 0]) for image in pool.images]
        batch = _batch(next_id, 4)
        out = pool.query(batch)
        after = [int(image[0, 0, 0]) for image in pool.images]
        assert len(pool) == 10
        available = list(before)
        for position, returned in enumerate(_ids(out)):
            new = next_id + position
            total += 1
            if returned == new:
                assert new not in after  # returned as is, not stored
                continue
            swapped += 1
            # an old image comes from the pool as it was, and the new image takes its slot
            assert returned in available
            slot = available.index(returned)
            available[slot] = new
        assert available == after
        next_id += 4
    assert abs(swapped / total - 0.5) < 0.04  # 1600 Bernoulli(0.5) draws: sd 0.0125


def test_pool_holds_detached_clones():
    pool = ImagePool(4)
    x = torch.rand(2, 1, 4, 4, requires_grad=True)
    out = pool.query(x * 2)
    assert not out.requires_grad
    assert all(not image.requires_grad for image in pool.images)
    stored = pool.images[0].clone()
    with torch.no_grad():
        x.mul_(0)  # changing the source does not change the pool
    torch.testing.assert_close(pool.images[0], stored)
    assert pool.images[0].data_ptr() != out[0].data_ptr()


def _run(seed: int) -> list[int]:
    pool = ImagePool(6, generator=torch.Generator().manual_seed(seed))
    ids = []
    for step in range(30):
        ids += _ids(pool.query(_batch(3 * step, 3)))
    return ids


def test_deterministic_with_seeded_generator():
    assert _run(7) == _run(7)
    assert _run(7) != _run(8)


def test_state_dict_round_trip():
    gen = torch.Generator().manual_seed(3)
    pool = ImagePool(5, generator=gen)
    for step in range(4):
        pool.query(_batch(2 * step, 2))
    buffer = io.BytesIO()
    torch.save(pool.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    restored = ImagePool(5, generator=torch.Generator().manual_seed(99))
    restored.load_state_dict(state)
    assert len(restored) == len(pool) == 5
    for a, b in zip(restored.images, pool.images, strict=True):
        torch.testing.assert_close(a, b)
    # same future: the generator state travels with the pool
    for step in range(10):
        batch = _batch(100 + 2 * step, 2)
        torch.testing.assert_close(restored.query(batch), pool.query(batch))

    partial = ImagePool(8)
    partial.load_state_dict({"pool_size": 8, "images": [torch.zeros(1, 4, 4)] * 3})
    assert len(partial) == 3
    with pytest.raises(ValueError, match="holds 5 images"):
        ImagePool(4).load_state_dict(state)
    with pytest.raises(ValueError, match="pool_size"):
        ImagePool(-1)


def test_pickled_pool_continues_identically():
    """DDP's spawned processes receive the model pickled; the pool's generator must survive it."""
    import pickle

    pool = ImagePool(pool_size=3, generator=torch.Generator().manual_seed(7))
    for _ in range(4):
        pool.query(torch.rand(2, 1, 4, 4))
    copy = pickle.loads(pickle.dumps(pool))
    assert len(copy) == len(pool) == 3
    batch = torch.rand(4, 1, 4, 4)
    torch.testing.assert_close(copy.query(batch), pool.query(batch), rtol=0, atol=0)
