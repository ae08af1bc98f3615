"""The pinned buffer pool: classes from the size histogram, one allocation, reuse, honest stats."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ds_tencache.pool import (PinnedBufferPool, PoolExhaustedError, align_up, class_of,
                              size_classes)

pytestmark = pytest.mark.unit

ALIGN = 4096
# One Llama layer (hidden 512, intermediate 1408, fp32): q/k/v/o, gate/up/down, two norms.
LAYER = [512 * 512 * 4] * 4 + [512 * 1408 * 4] * 3 + [512 * 4] * 2


def test_few_distinct_sizes_get_exact_classes():
    assert size_classes(LAYER * 4, max_classes=16, alignment=ALIGN) == [
        ALIGN, 512 * 512 * 4, 512 * 1408 * 4]


def test_rare_sizes_round_up_and_the_largest_is_always_a_class():
    sizes = [8192] * 50 + [16384] * 40 + [12288] + [20480] + [1 << 20]
    classes = size_classes(sizes, max_classes=3, alignment=ALIGN)
    assert classes == [8192, 16384, 1 << 20]  # two most frequent + the largest
    assert class_of(12288, classes, ALIGN) == 16384
    assert class_of(20480, classes, ALIGN) == 1 << 20


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 1 << 22), min_size=1, max_size=60), st.integers(1, 8))
def test_every_size_fits_a_class_within_the_limit(sizes, max_classes):
    classes = size_classes(sizes, max_classes, ALIGN)
    assert 1 <= len(classes) <= max_classes
    assert all(c % ALIGN == 0 for c in classes)
    for size in sizes:
        assert align_up(size, ALIGN) <= class_of(size, classes, ALIGN)


def test_buffers_are_reused_with_one_allocation():
    allocations = []

    def counting_allocator(nbytes):
        allocations.append(nbytes)
        return torch.empty(nbytes, dtype=torch.uint8)

    pool = PinnedBufferPool({8192: 2, 16384: 1}, ALIGN, counting_allocator)
    for _ in range(100):  # 100 "steps" of the same demand
        held = [pool.acquire(5000), pool.acquire(8192), pool.acquire(10000)]
        for buffer in held:
            pool.release(buffer)
    stats = pool.stats()
    assert allocations == [2 * 8192 + 16384] and stats.allocations == 1
    assert stats.acquires == 300 and stats.in_use_bytes == 0
    assert stats.peak_in_use_bytes == 2 * 8192 + 16384
    assert stats.utilisation == pytest.approx((5000 + 8192 + 10000) / (2 * 8192 + 16384))


def test_peak_in_use_is_the_most_bytes_held_at_once():
    pool = PinnedBufferPool({8192: 1, 16384: 1}, ALIGN)
    big = pool.acquire(16000)  # the tensor bytes peak here ...
    pool.release(big)
    a, b = pool.acquire(8000), pool.acquire(5000, spill=True)  # ... the class bytes here (spilled)
    stats = pool.stats()
    assert stats.peak_in_use_bytes == 8192 + 16384 and stats.requested_at_peak_bytes == 13000
    assert stats.peak_requested_bytes == 16000
    assert stats.utilisation == pytest.approx(16000 / (8192 + 16384))
    assert stats.fragmentation == pytest.approx(1 - 13000 / (8192 + 16384))
    pool.release(a), pool.release(b)


def test_views_do_not_overlap():
    pool = PinnedBufferPool({4096: 3, 8192: 2}, ALIGN)
    buffers = [pool.acquire(4096) for _ in range(3)] + [pool.acquire(8000) for _ in range(2)]
    for index, buffer in enumerate(buffers):
        buffer.view.fill_(index)
    for index, buffer in enumerate(buffers):
        assert torch.all(buffer.view == index)


def test_exhaustion_and_double_release_are_errors():
    pool = PinnedBufferPool({4096: 1}, ALIGN)
    buffer = pool.acquire(100)
    with pytest.raises(PoolExhaustedError, match="all 4096-byte buffers are in use"):
        pool.acquire(100)
    pool.release(buffer)
    with pytest.raises(ValueError, match="released twice"):
        pool.release(buffer)
    with pytest.raises(ValueError, match="no buffer class holds 5000 bytes"):
        pool.acquire(5000)


def test_for_demand_sizes_each_class_for_its_peak():
    moments = [LAYER, LAYER + LAYER[:4], LAYER[4:]]  # at most 8 square matrices at once
    pool = PinnedBufferPool.for_demand(moments, max_classes=16, alignment=ALIGN)
    squares = [pool.acquire(512 * 512 * 4) for _ in range(8)]
    with pytest.raises(PoolExhaustedError):
        pool.acquire(512 * 512 * 4)
    for buffer in squares:
        pool.release(buffer)


def test_utilisation_beats_fixed_slots_on_a_transformer():
    """Stock's fixed slots (one per parameter, sized for the largest) against size classes."""
    model = LAYER * 8
    pool = PinnedBufferPool.for_demand([model], max_classes=16, alignment=ALIGN)
    for size in model:
        pool.acquire(size)
    ours = pool.stats().utilisation
    fixed_slots = sum(model) / (len(model) * align_up(max(model), ALIGN))
    assert ours >= 0.9 > fixed_slots


def test_bad_classes_are_rejected():
    with pytest.raises(ValueError, match="multiples of the alignment 4096"):
        PinnedBufferPool({1000: 1}, ALIGN)
    with pytest.raises(ValueError, match="max_classes must be at least 1"):
        size_classes([1], 0, ALIGN)


def test_recarve_divides_the_same_allocation_and_refuses_while_in_use():
    allocations = []

    def counting_allocator(nbytes):
        allocations.append(nbytes)
        return torch.empty(nbytes, dtype=torch.uint8)

    pool = PinnedBufferPool({16384: 2}, ALIGN, counting_allocator, capacity_bytes=40960)
    held = pool.acquire(10000)
    with pytest.raises(RuntimeError, match="in use"):
        pool.recarve({4096: 10})
    pool.release(held)
    with pytest.raises(ValueError, match="more than the pool's 40960"):
        pool.recarve({8192: 6})
    pool.recarve({4096: 4, 8192: 3})
    assert pool.buffers_per_class() == {4096: 4, 8192: 3}
    offsets = {pool.acquire(4096).offset for _ in range(4)} | {pool.acquire(8000).offset for _ in range(3)}
    assert len(offsets) == 7 and max(offsets) + 8192 <= 40960  # disjoint, inside the allocation
    assert allocations == [40960] and pool.stats().allocations == 1
