"""Hardware presets: achievable rates below peak, the links in a plausible order."""

from __future__ import annotations

import pytest

from ds_tencache.hardware import PCIE4_X16_GBPS, PRESETS

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_consistent(name):
    hw = PRESETS[name]
    assert 0 < hw.flop_fraction <= 1 and hw.flops_per_s < hw.peak_flops
    assert hw.h2d_bytes_per_s < 2 * PCIE4_X16_GBPS * 1e9  # at most a PCIe 5 x16 link
    assert hw.nvme_read_bytes_per_s < hw.h2d_bytes_per_s  # NVMe is the slower tier
    assert hw.compute_s(hw.flops_per_s) == pytest.approx(1.0 + hw.group_overhead_s)
