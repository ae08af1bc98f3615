"""The host tiers: warm-up carving, staging demand, resident choice, and the swap files' checks."""

from __future__ import annotations

import os
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ds_tencache.plan import Fetch, Plan, build_plan
from ds_tencache.pool import class_of, size_classes
from ds_tencache.tiers import (PACK_ITEM_ALIGNMENT, SwapFileError, SwapFiles, TierBudgetError,
                               checksum, optimizer_cpu_subgroups, pack_offsets, plan_tiers,
                               staging_peak, warmup_carving)

pytestmark = pytest.mark.unit

ALIGN = 4096


def test_warmup_carving_deals_buffers_largest_first_until_full():
    sizes = [3 * ALIGN] * 4 + [ALIGN] * 10
    carving = warmup_carving(sizes, capacity=9 * ALIGN, max_classes=8, alignment=ALIGN)
    # rounds: (3+1) (3+1) then 1 more byte-class fits: 3+1+3+1+1 = 9 pages
    assert carving == {3 * ALIGN: 2, ALIGN: 3}
    with pytest.raises(TierBudgetError, match="cpu_budget = 8192 bytes cannot hold one staging"):
        warmup_carving(sizes, capacity=2 * ALIGN, max_classes=8, alignment=ALIGN)


def _forward_backward(layers: int) -> list[tuple[int, ...]]:
    forward = [(p,) for p in range(layers)]
    return forward + forward[::-1]


def test_staging_peak_holds_a_buffer_from_read_to_gather():
    # param 0 read on demand for group 0; 1 and 2 prefetched after groups 0 and 1 for group 2;
    # 3 read on demand for group 3. Group 0's gather returns its buffer before 1 is prefetched.
    fetches = [Fetch(0, 0, 0, (), ALIGN, 0.0), Fetch(1, 2, 0, (), ALIGN, 0.0),
               Fetch(2, 2, 1, (), ALIGN, 0.0), Fetch(3, 3, 3, (), ALIGN, 0.0)]
    plan = Plan(fetches=fetches, uses=4, budget_bytes=4 * ALIGN, peak_resident_bytes=4 * ALIGN)
    classes = {0: ALIGN, 1: ALIGN, 2: 2 * ALIGN, 3: ALIGN}
    assert staging_peak(plan, set(range(4)), classes) == Counter({ALIGN: 1, 2 * ALIGN: 1})
    classes[2] = ALIGN
    assert staging_peak(plan, set(range(4)), classes) == Counter({ALIGN: 2})  # 1 and 2 in flight
    assert staging_peak(plan, {0, 3}, classes) == Counter({ALIGN: 1})
    assert staging_peak(plan, set(), classes) == Counter()


def _layout(groups, sizes, budget, capacity, max_classes=8):
    compute = [1e-3] * len(groups)

    def build(device_budget):
        return build_plan(groups, sizes, device_budget, compute, 1e9)

    return plan_tiers(build, budget, sizes, capacity, max_classes, ALIGN)


def test_hottest_partitions_stay_in_the_cpu_tier():
    # Parameter 0 is used in every group's neighbourhood (fetched often); the rest once each way.
    groups = [(0, 1), (0, 2), (0, 3), (3,), (2,), (1,)]
    sizes = {p: ALIGN for p in range(4)}
    plan, layout = _layout(groups, sizes, budget=2 * ALIGN, capacity=3 * ALIGN)
    assert layout.carved_bytes <= 3 * ALIGN
    fetched = Counter(f.param_id for f in plan.fetches)
    assert all(fetched[r] >= fetched[s] for r in layout.cpu_resident
               for s in set(sizes) - layout.cpu_resident)
    assert layout.nvme_read_bytes_per_step == sum(
        sizes[f.param_id] for f in plan.fetches if f.param_id not in layout.cpu_resident)


def test_too_small_a_cpu_tier_is_a_clear_error():
    groups = _forward_backward(3)
    sizes = {p: 2 * ALIGN for p in range(3)}
    with pytest.raises(TierBudgetError, match="cpu_budget = 4096 bytes is too small"):
        _layout(groups, sizes, budget=4 * ALIGN, capacity=ALIGN)


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 10), st.integers(0, 2**32 - 1), st.integers(1, 12))
def test_layout_fits_the_capacity_and_covers_every_streamed_class(layers, seed, pages):
    rng = random.Random(seed)
    sizes = {p: rng.choice([ALIGN, 2 * ALIGN, 5 * ALIGN + 7]) for p in range(layers)}
    groups = _forward_backward(layers)
    biggest = max(sizes.values())
    try:
        plan, layout = _layout(groups, sizes, budget=4 * biggest, capacity=pages * ALIGN)
    except TierBudgetError:
        return  # honestly refused: checked above
    assert layout.carved_bytes <= pages * ALIGN
    classes = size_classes(sizes.values(), 8, ALIGN)
    streamed = set(sizes) - layout.cpu_resident
    peak = staging_peak(plan, streamed, {p: class_of(n, classes, ALIGN) for p, n in sizes.items()})
    for size, count in peak.items():
        assert layout.staging_per_class.get(size, 0) >= count
    for param in streamed:  # a write-back buffer for every streamed class
        assert layout.staging_per_class.get(class_of(sizes[param], classes, ALIGN), 0) >= 1
    # never reads more than streaming everything would
    assert layout.nvme_read_bytes_per_step <= sum(sizes[f.param_id] for f in plan.fetches)


def test_small_partitions_share_one_packed_buffer():
    groups = _forward_backward(4)
    sizes = {0: 2 * ALIGN, 1: 100, 2: 2 * ALIGN, 3: 1000}  # 1 and 3: under the alignment
    plan, layout = _layout(groups, sizes, budget=4 * ALIGN, capacity=6 * ALIGN)
    assert layout.packed == {1: 0, 3: 128}  # 100 bytes rounded up to two 64-byte lines
    assert layout.pack_bytes == ALIGN and layout.buffers_per_class[ALIGN] == 1
    assert layout.cpu_resident.isdisjoint(layout.packed)
    assert layout.resident_bytes >= 1100  # packed bytes count as resident
    assert layout.carved_bytes <= 6 * ALIGN
    # the packed partitions are never read from NVMe: only whole 2 x ALIGN partitions are
    assert layout.nvme_read_bytes_per_step % (2 * ALIGN) == 0


@given(st.lists(st.integers(1, 5000), max_size=40))
def test_packed_partitions_never_overlap(sizes):
    offsets, end = pack_offsets(dict(enumerate(sizes)))
    spans = sorted((offsets[i], offsets[i] + n) for i, n in enumerate(sizes))
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
    assert all(start % PACK_ITEM_ALIGNMENT == 0 for start, _ in spans)
    assert end >= (spans[-1][1] if spans else 0)


# --- swap files ---------------------------------------------------------------------------------

def _written(files: SwapFiles, param_id: int, data: torch.Tensor) -> Path:
    path = Path(files.path(param_id))
    raw = data.view(torch.uint8).numpy().tobytes()
    path.write_bytes(raw + b"\0" * (-len(raw) % ALIGN))
    files.wrote(param_id, data, len(raw) + (-len(raw) % ALIGN))
    return path


def test_intact_file_reads_back_and_checksum_is_stable(tmp_path):
    files = SwapFiles(tmp_path / "nvme")
    data = torch.arange(1000, dtype=torch.float32).to(torch.bfloat16)
    _written(files, 7, data)
    files.check_readable(7)
    files.verify_read(7, data.clone())
    assert checksum(data) == checksum(data.clone()) != checksum(data + 1)


def test_missing_truncated_and_corrupt_files_name_the_file(tmp_path):
    files = SwapFiles(tmp_path / "nvme")
    data = torch.randn(3000)
    path = _written(files, 1, data)
    corrupt = data.clone()
    corrupt[17] += 1
    with pytest.raises(SwapFileError, match=rf"{path}.* is corrupted"):
        files.verify_read(1, corrupt)
    os.truncate(path, 100)
    with pytest.raises(SwapFileError, match=rf"{path} is truncated: 100 of 12288 bytes"):
        files.check_readable(1)
    path.unlink()
    with pytest.raises(SwapFileError, match=rf"{path} is missing"):
        files.check_readable(1)
    with pytest.raises(SwapFileError, match="tensor 2 was never written"):
        files.check_readable(2)


def test_checksums_can_be_switched_off(tmp_path):
    files = SwapFiles(tmp_path / "nvme", verify=False)
    data = torch.randn(10)
    _written(files, 1, data)
    files.verify_read(1, data + 1)  # not checked, by the user's choice


def test_unwritable_folder_and_full_disk_are_clear_errors(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(SwapFileError, match=rf"NVMe tier folder {blocker}/nvme is not writable"):
        SwapFiles(blocker / "nvme")
    files = SwapFiles(tmp_path / "nvme")
    usage = os.statvfs(tmp_path)
    monkeypatch.setattr("shutil.disk_usage",
                        lambda _: type("Usage", (), {"free": 1000})())
    with pytest.raises(SwapFileError, match="disk full .*4096 bytes to write, 1000 free"):
        files.ensure_space(4096)
    assert usage.f_bsize  # the real filesystem was reachable before the injected fault


def test_swap_files_are_removed_with_their_store(tmp_path):
    files = SwapFiles(tmp_path / "nvme")
    _written(files, 1, torch.randn(10))
    folder = files.folder
    del files
    assert not folder.exists()


def test_optimizer_cpu_tier_keeps_the_largest_sub_groups_that_fit():
    numels = [100, 400, 300, 50, 400]
    # 16 bytes per element; 50 elements are under the swap minimum and stay in memory anyway
    kept = optimizer_cpu_subgroups(numels, 16 * 750, swappable=lambda n: n >= 100)
    assert kept == {1, 2}  # 400 (the first of two), then 300 fits, 100 does not
    assert optimizer_cpu_subgroups(numels, 0, swappable=lambda n: True) == frozenset()


@given(st.lists(st.integers(1, 10_000), max_size=30), st.integers(0, 200_000))
def test_optimizer_cpu_tier_never_exceeds_its_budget(numels, budget):
    kept = optimizer_cpu_subgroups(numels, budget, swappable=lambda n: n >= 10)
    assert sum(numels[i] for i in kept) * 16 <= budget
    assert all(numels[i] >= 10 for i in kept)
    # greedy is maximal: no swappable sub-group left out would still fit
    left = budget - sum(numels[i] for i in kept) * 16
    assert all(numels[i] * 16 > left for i in range(len(numels)) if i not in kept and numels[i] >= 10)
