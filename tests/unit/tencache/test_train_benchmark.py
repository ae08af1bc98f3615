"""benchmarks/tencache_train.py's workload sweep without training: parsing and each row's ratios."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.unit


def test_workloads_parse_in_order(train_bench):
    assert train_bench.parse_workloads("1x32, 4x64") == [(1, 32), (4, 64)]
    assert train_bench.parse_workloads(train_bench.NVME_WORKLOADS)[0] == (1, 32)  # the headline


@pytest.mark.parametrize("text", ["32", "0x32", "1x1", "ax4", "1x32,"])
def test_a_malformed_workload_is_refused_with_the_form_to_use(train_bench, text):
    with pytest.raises(ValueError, match="MICRO_BATCHxSEQ_LEN"):
        train_bench.parse_workloads(text)


def test_bad_workload_flag_is_a_usage_error_not_a_traceback(train_bench, capsys):
    with pytest.raises(SystemExit) as exit_:
        train_bench.main(["--nvme-workloads", "4by64"])
    assert exit_.value.code == 2
    assert "write it as MICRO_BATCHxSEQ_LEN" in capsys.readouterr().err


def test_a_workload_row_sets_tencache_and_the_floor_against_stock(train_bench):
    figures = {"stock": {"step_time_median_s": 0.2, "fetch_wait_s_per_step": 0.05},
               "tencache": {"step_time_median_s": 0.15, "fetch_wait_s_per_step": 0.01},
               "host_memory_step_time_median_s": 0.12, "step_time_ratio": 0.74,
               "pair_ratios": [0.74, 0.8, 0.7], "losses_identical": True}
    row = train_bench.workload_row((2, 16), figures)
    assert row["tokens_per_step"] == 32
    assert row["step_time_ratio"] == 0.74  # the paired ratio, as compare_sides gave it
    assert row["pair_ratios"] == [0.74, 0.8, 0.7]
    assert row["host_memory_ratio"] == pytest.approx(0.6)
    assert row["tencache_over_host_memory"] == pytest.approx(1.25)
