"""Stock ZeRO-3 against ds_tencache on a real CUDA device: the A/B of ``tencache_train.py`` on a GPU.

    .venv/bin/python benchmarks/tencache_gpu.py        # writes benchmarks/results/tencache_gpu.json

The runs are ``tencache_train.py``'s own workers (same tiny Llama, seed, batches and configs;
tencache's device budget half the parameter bytes, stock's ``stage3_max_live_parameters`` and
``stage3_max_reuse_distance`` set to the same budget), spawned one process each. On a CUDA host
DeepSpeed picks its CUDA accelerator by itself, so the same worker then moves parameters between
real pinned host memory (``pin_memory: true``) and the device on CUDA streams (ZeRO-3's
coordinator and ds_tencache's prefetches both issue on the accelerator's streams). What this
script adds is the device's own view: ``nvidia-smi`` is sampled while each run trains, and its
peak memory above the idle reading is recorded per side.

Without a CUDA device (this repository's CI machine) it prints "skipped: no CUDA device" and exits
with status 0, leaving any committed results untouched.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import tencache_train  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SKIP_MESSAGE = "skipped: no CUDA device"
# nvidia-smi answers in ~20-50 ms; sampling every 100 ms sees every plateau of a step that lasts
# longer than that (the tiny models' steps take 50-300 ms even on a GPU: ZeRO-3's hooks dominate).
SAMPLE_INTERVAL_S = 0.1
MIB = 2**20
SMI_QUERY = ["nvidia-smi", "--query-gpu=index,name,memory.used,memory.total,driver_version",
             "--format=csv,noheader,nounits"]


@dataclass(frozen=True)
class GpuReading:
    """One GPU's line of ``nvidia-smi --query-gpu=index,name,memory.used,memory.total,driver_version``."""

    index: int
    name: str
    used_bytes: int  # nvidia-smi reports MiB; kept in bytes like every other figure here
    total_bytes: int
    driver: str


def parse_nvidia_smi(text: str) -> list[GpuReading]:
    """Parse the CSV of :data:`SMI_QUERY` (``noheader,nounits``: memory in MiB), one GPU per line.

    A line that does not have the five fields, or whose memory is not a number (nvidia-smi prints
    "[N/A]" on some virtualised GPUs), raises ValueError naming the line: a silent zero would
    read as "no memory used".
    """
    readings = []
    for line in text.strip().splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 5:
            raise ValueError(f"nvidia-smi line {line!r}: expected index, name, memory.used, "
                             f"memory.total, driver_version")
        index, name, used, total, driver = fields
        try:
            readings.append(GpuReading(int(index), name, int(float(used) * MIB),
                                       int(float(total) * MIB), driver))
        except ValueError as error:
            raise ValueError(f"nvidia-smi line {line!r}: {error}") from None
    return readings


def query_gpus() -> list[GpuReading]:
    """The current reading of every GPU, from nvidia-smi."""
    done = subprocess.run(SMI_QUERY, capture_output=True, text=True, check=True)
    return parse_nvidia_smi(done.stdout)


def cuda_available() -> bool:
    """A CUDA device torch can use, and nvidia-smi to read its memory."""
    import torch

    return torch.cuda.is_available() and shutil.which("nvidia-smi") is not None


class PeakMemorySampler:
    """Samples one GPU's used memory in a background thread; ``peak_bytes`` is the highest seen.

    ``read`` is injectable so the logic is testable without a GPU.
    """

    def __init__(self, gpu_index: int, read: Callable[[], list[GpuReading]] = query_gpus,
                 interval_s: float = SAMPLE_INTERVAL_S) -> None:
        self.gpu_index = gpu_index
        self.read = read
        self.interval_s = interval_s
        self.peak_bytes = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        reading = next(r for r in self.read() if r.index == self.gpu_index)
        self.peak_bytes = max(self.peak_bytes, reading.used_bytes)
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakMemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()  # one reading after the run, so a run shorter than the interval counts


def measure(modes: list[str], size: str, steps: int, repeats: int, gpu_index: int,
            scratch: Path) -> tuple[dict, dict]:
    """Every run of the plan, each under a memory sampler: runs by mode and side, and the peak
    device memory each run held above the idle reading (bytes)."""
    from tqdm import tqdm

    idle = next(r for r in query_gpus() if r.index == gpu_index).used_bytes
    runs: dict = {mode: {} for mode in modes}
    held: dict = {mode: {} for mode in modes}
    # The A/B and stock's instrumented run; the CPU benchmark's reference runs add nothing here.
    plan = tencache_train.run_plan(modes, repeats, references=False)
    for mode, side in tqdm(plan, desc="GPU training runs", unit="run"):
        with PeakMemorySampler(gpu_index) as sampler:
            run = tencache_train.spawn(mode, side, size, steps, scratch)
        runs[mode].setdefault(side, []).append(run)
        held[mode].setdefault(side, []).append(sampler.peak_bytes - idle)
    return runs, held


def summarise_mode(mode: str, runs: dict, held: dict) -> dict:
    """``tencache_train.compare_sides``, plus each side's nvidia-smi peak above idle."""
    figures = tencache_train.compare_sides(mode, runs)
    for side in tencache_train.SIDES:
        figures[side]["gpu_mem_held_peak_bytes"] = max(held[side])
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", help="tiny-model size (tiny, small, medium)")
    parser.add_argument("--steps", type=int, default=50, help="training steps per run (at least 50)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per side, interleaved")
    parser.add_argument("--modes", default="cpu", help="comma-separated: cpu, nvme")
    parser.add_argument("--gpu", type=int, default=0, help="nvidia-smi index of the GPU the runs use")
    parser.add_argument("--out", type=Path, default=RESULTS / "tencache_gpu.json")
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    if args.steps < 50:
        parser.error("--steps must be at least 50 (the issue's comparison length)")
    if not set(modes) <= {"cpu", "nvme"}:
        parser.error(f"--modes {args.modes!r}: choose from cpu, nvme")
    if not cuda_available():
        print(SKIP_MESSAGE)
        return 0

    started = time.perf_counter()
    gpu = next(r for r in query_gpus() if r.index == args.gpu)
    scratch = args.out.parent / ".scratch-gpu"
    scratch.mkdir(parents=True, exist_ok=True)
    runs, held = measure(modes, args.size, args.steps, args.repeats, args.gpu, scratch)
    shutil.rmtree(scratch)

    first = next(iter(next(iter(runs.values())).values()))[0]
    result = {
        "device": {**asdict(gpu), "sample_interval_s": SAMPLE_INTERVAL_S},
        "model": {"size": args.size, "num_parameters": first["num_parameters"],
                  "steps": args.steps, "repeats": args.repeats,
                  "warmup_steps": tencache_train.WARMUP_STEPS,
                  "device_budget_bytes": {mode: runs[mode]["stock"][0]["budget_bytes"] for mode in modes}},
        "modes": {mode: summarise_mode(mode, runs[mode], held[mode]) for mode in modes},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"wrote {args.out} in {time.perf_counter() - started:.0f} s")
    return 0


def print_table(result: dict) -> None:
    device, model = result["device"], result["model"]
    print(f"\n{device['name']} (driver {device['driver']}), {model['size']} Llama, "
          f"{model['num_parameters']:,} parameters, {model['steps']} steps x {model['repeats']} runs per side")
    print(f"{'mode / side':<18}{'step median':>14}{'hit rate':>10}{'GPU mem held':>15}")
    for mode, figures in result["modes"].items():
        for side in tencache_train.SIDES:
            row = figures[side]
            if row is None:
                print(f"{mode + ' ' + side:<18}{'(not measured yet)':>30}")
                continue
            hit = "-" if row["hit_rate"] is None else f"{row['hit_rate']:.3f}"
            print(f"{mode + ' ' + side:<18}{row['step_time_median_s'] * 1e3:>11.1f} ms{hit:>10}"
                  f"{row['gpu_mem_held_peak_bytes'] / MIB:>11.0f} MiB")
        if figures["step_time_ratio"] is not None:
            print(f"{mode}: tencache/stock step time {figures['step_time_ratio']:.3f} (median of "
                  f"back-to-back pairs), losses identical: {figures['losses_identical']}")


if __name__ == "__main__":
    raise SystemExit(main())
