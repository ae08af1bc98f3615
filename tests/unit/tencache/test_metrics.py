"""Metrics records: hit rate arithmetic, JSON lines every N steps, a readable log line."""

from __future__ import annotations

import json
import logging

import pytest

from ds_tencache.metrics import MetricsReporter, StepCounters, StepMetrics

pytestmark = pytest.mark.unit


def counters(uses_hit: list[bool], wait_s: float = 0.0) -> StepCounters:
    tally = StepCounters(fetch_wait_s=wait_s, all_gathers=2)
    for hit in uses_hit:
        tally.use(hit)
    tally.moved("cpu_to_device", 3 << 20)
    tally.moved("cpu_to_device", 1 << 20)
    return tally


def test_hit_rate_and_bytes_from_counters():
    metrics = StepMetrics.from_counters(4, "planned", 0.25, counters([True, True, True, False], 0.01))
    assert metrics.hit_rate == 0.75 and metrics.uses == 4
    assert metrics.bytes_moved == {"cpu_to_device": 4 << 20}
    assert metrics.summary() == ("tencache step 4 [planned]: 250 ms, hit rate 0.750 of 4 uses, "
                                 "waited 10.0 ms, 2 all-gathers, moved cpu_to_device 4.0 MiB")


def test_a_step_without_uses_counts_as_all_hits():
    assert StepMetrics.from_counters(0, "profiling", 0.1, StepCounters()).hit_rate == 1.0


def test_reporter_writes_every_nth_step_and_logs(tmp_path, caplog):
    path = tmp_path / "out" / "metrics.jsonl"
    reporter = MetricsReporter(path, every_n_steps=2)
    with caplog.at_level(logging.INFO, logger="ds_tencache"):
        for step in range(5):
            reporter.report(StepMetrics.from_counters(step, "planned", 0.1, counters([True])))
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2, 4]
    assert records[0]["hit_rate"] == 1.0 and records[0]["bytes_moved"] == {"cpu_to_device": 4 << 20}
    assert len(reporter.history) == 5
    assert sum("tencache step" in r.message for r in caplog.records) == 3


def test_a_new_reporter_starts_a_fresh_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"stale": true}\n')
    MetricsReporter(path).report(StepMetrics.from_counters(0, "planned", 0.1, StepCounters()))
    assert len(path.read_text().splitlines()) == 1


def test_every_n_steps_must_be_positive():
    with pytest.raises(ValueError, match="every_n_steps must be at least 1, got 0"):
        MetricsReporter(None, every_n_steps=0)
