"""benchmarks/tencache_gpu.py without a GPU: nvidia-smi parsing, the sampler, the run plan, the skip."""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[3]



# Two GPUs as nvidia-smi prints them with --format=csv,noheader,nounits (memory in MiB).
TWO_GPUS = ("0, NVIDIA H100 80GB HBM3, 1234, 81559, 550.54.15\n"
            "1, NVIDIA H100 80GB HBM3, 0, 81559, 550.54.15\n")


def test_parses_every_gpu_in_bytes(gpu_bench):
    first, second = gpu_bench.parse_nvidia_smi(TWO_GPUS)
    assert (first.index, first.name, first.driver) == (0, "NVIDIA H100 80GB HBM3", "550.54.15")
    assert (first.used_bytes, first.total_bytes) == (1234 * 2**20, 81559 * 2**20)
    assert (second.index, second.used_bytes) == (1, 0)


@pytest.mark.parametrize("line", ["0, NVIDIA A100, [N/A], 40960, 535.1",
                                  "0, NVIDIA A100, 12, 40960"])
def test_unreadable_lines_raise_naming_the_line(gpu_bench, line):
    with pytest.raises(ValueError, match="nvidia-smi line"):
        gpu_bench.parse_nvidia_smi(line)


def test_sampler_keeps_the_peak_of_its_gpu(gpu_bench):
    # endless: the sampler thread may take many readings before this one checks its count
    used_mib = itertools.chain([100, 900, 300], itertools.repeat(200))

    def read():
        return gpu_bench.parse_nvidia_smi(f"0, GPU, 5000, 8000, 1\n1, GPU, {next(used_mib)}, 8000, 1")

    with gpu_bench.PeakMemorySampler(1, read=read, interval_s=0.0) as sampler:
        while sampler.samples < 3:
            pass
    assert sampler.peak_bytes == 900 * 2**20  # GPU 0's 5000 MiB is not this run's device


def test_run_plan_alternates_sides_then_measures_stock(gpu_bench):
    ab = [("stock", "tencache")] * 2
    assert gpu_bench.tencache_train.run_plan(["cpu", "nvme"], 2, references=False) == [
        *[("cpu", side) for pair in ab for side in pair], ("cpu", "stock_measured"),
        *[("nvme", side) for pair in ab for side in pair], ("nvme", "stock_measured")]
    assert gpu_bench.tencache_train.run_plan(["nvme"], 1) == [
        ("nvme", "stock"), ("nvme", "tencache"), ("nvme", "host_memory"), ("nvme", "stock_measured")]


def test_skips_cleanly_without_a_cuda_device(gpu_bench, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(gpu_bench, "cuda_available", lambda: False)
    out = tmp_path / "tencache_gpu.json"
    assert gpu_bench.main(["--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == gpu_bench.SKIP_MESSAGE
    assert not out.exists()


def test_script_skips_on_this_machine_when_it_has_no_cuda_device(gpu_bench):
    # The real path end to end, as CI runs it: exit status 0 and the message, nothing written.
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device: the benchmark would really run")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tencache_gpu.py"),
                           "--out", "/nonexistent/tencache_gpu.json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == gpu_bench.SKIP_MESSAGE


def fake_run(step_s: float, losses: list[float], hit_rate: float | None) -> dict:
    """A worker record of tencache_train.py with only what summarise and paired_ratio read."""
    return {"step_times_s": [9.0, 9.0] + [step_s] * 4, "losses": losses, "hit_rate": hit_rate,
            "fetch_wait_s_per_step": 0.0, "pinned_swap_bytes": None,
            "bytes_read_nvme_per_step": None, "peak_rss_bytes": 1}


def test_summary_reuses_the_cpu_benchmark_figures_and_adds_device_memory(gpu_bench):
    runs = {"stock": [fake_run(0.2, [1.0, 0.5], None), fake_run(0.4, [1.0, 0.5], None)],
            "tencache": [fake_run(0.1, [1.0, 0.5], 1.0), fake_run(0.4, [1.0, 0.5], 1.0)],
            "stock_measured": [fake_run(0.3, [1.0, 0.5], 0.25)]}
    held = {"stock": [3 * 2**20, 5 * 2**20], "tencache": [2 * 2**20, 2 * 2**20], "stock_measured": [0]}
    summary = gpu_bench.summarise_mode("cpu", runs, held)
    assert summary["stock"]["hit_rate"] == 0.25  # from the instrumented stock run
    assert summary["stock"]["gpu_mem_held_peak_bytes"] == 5 * 2**20
    assert summary["tencache"]["step_time_median_s"] == pytest.approx(0.25)
    assert summary["step_time_ratio"] == pytest.approx(0.75)  # median of pairs 0.5 and 1.0
    assert summary["losses_identical"] is True
