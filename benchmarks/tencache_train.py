"""Stock ZeRO-3 against ds_tencache on the same tiny Llama, seed and batches, side by side.

    .venv/bin/python benchmarks/tencache_train.py            # writes benchmarks/results/tencache_train.{json,png}

Each run is its own process, so peak RSS belongs to one run and no state leaks between them;
runs alternate stock / tencache / stock / ... to spread the machine's noise over both sides.
tencache's device budget is half the model's parameter bytes: a budget that held the whole model
would make every fetch a trivial hit.

Both sides get the same device memory: stock's ``stage3_max_live_parameters`` and
``stage3_max_reuse_distance`` are set to the budget, its own knobs for what it may hold.

Four kinds of run per mode:
- ``stock``: ``deepspeed.initialize`` with the budgeted config (step times, losses, RSS);
- ``stock_default``: the same with DeepSpeed's defaults (1e9 elements live, so it holds the whole
  model): recorded for reference as ``stock_default_step_time_median_s``;
- ``tencache``: ``ds_tencache.initialize`` with the block;
- ``stock_measured``: the tencache coordinator kept in its profiling phase for the whole run,
  which executes stock ZeRO-3's code paths unchanged and counts hits and waits: stock's hit rate
  and fetch wait come from here, its step times from the uninstrumented ``stock`` runs.

The ``nvme`` mode is filled in by the NVMe-tier issue; until then it is recorded as null.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
BASE_CONFIG = ROOT / "configs" / "zero3_cpu_offload.json"
WARMUP_STEPS = 2
SIDES = ("stock", "tencache")


def run_config(side: str, budget: int, steps: int) -> dict:
    config = json.loads(BASE_CONFIG.read_text())
    if side in ("stock", "stock_measured"):
        # Equal device memory: stock may keep at most the budget live (prefetch limit) and
        # releases what is not reused within it (stock's own two knobs, in fp32 elements).
        zero = config["zero_optimization"]
        zero["stage3_max_live_parameters"] = budget // 4
        zero["stage3_max_reuse_distance"] = budget // 4
    if side == "tencache":
        config["tencache"] = {"device_budget": budget, "warmup_steps": WARMUP_STEPS}
    elif side == "stock_measured":
        config["tencache"] = {"device_budget": budget, "warmup_steps": steps + 1}
    return config


def worker(side: str, size: str, steps: int, out: Path) -> None:
    """One training run in this process; writes its figures to ``out``."""
    from tiny_llama.environment import apply_runtime_defaults

    apply_runtime_defaults()
    import ds_tencache
    from ds_tencache.training_run import train
    from tiny_llama import ensure_model

    model_dir = ensure_model(size)
    manifest = json.loads((model_dir / "manifest.json").read_text())
    budget = manifest["num_parameters"] * 4 // 2
    config = run_config(side, budget, steps)
    result = train(model_dir, config, steps=steps,
                   initialize=None if side.startswith("stock") and side != "stock_measured"
                   else ds_tencache.initialize)
    records = result.tencache_steps or []
    measured = [m for m in records if m.step >= WARMUP_STEPS]
    out.write_text(json.dumps({
        "side": side,
        "losses": result.losses,
        "step_times_s": result.step_times_s,
        "hit_rate": statistics.fmean(m.hit_rate for m in measured) if measured else None,
        "fetch_wait_s_per_step": statistics.fmean(m.fetch_wait_s for m in measured) if measured else None,
        "bytes_moved_per_step": statistics.fmean(sum(m.bytes_moved.values()) for m in measured) if measured else None,
        "phases": sorted({m.phase for m in measured}),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "budget_bytes": budget,
        "num_parameters": manifest["num_parameters"],
        "size": size,
    }))


def spawn(side: str, size: str, steps: int, scratch: Path) -> dict:
    out = scratch / f"{side}-{os.getpid()}-{len(list(scratch.iterdir()))}.json"
    command = [sys.executable, __file__, "--worker", side, "--size", size, "--steps", str(steps),
               "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise SystemExit(f"{side} run failed (exit {done.returncode}); its output is above")
    return json.loads(out.read_text())


def summarise(runs: list[dict], measured: dict | None) -> dict:
    """Median step time over the post-warm-up steps of every run of one side."""
    times = [t for run in runs for t in run["step_times_s"][WARMUP_STEPS:]]
    figures = measured if measured is not None else runs[0]
    return {
        "step_time_median_s": statistics.median(times),
        "hit_rate": figures["hit_rate"],
        "fetch_wait_s_per_step": figures["fetch_wait_s_per_step"],
        "losses": runs[0]["losses"],
        "pinned_bytes_reserved": None,  # the pinned pool arrives with the NVMe-tier issue
        "pinned_bytes_used_peak": None,
        "allocations_after_warmup": None,
        "bytes_read_nvme_per_step": None,
        "peak_rss_bytes": max(run["peak_rss_bytes"] for run in runs),
    }


def paired_ratio(stock: list[dict], tencache: list[dict]) -> float:
    """Median over back-to-back run pairs of tencache's median step time over stock's.

    The machine's background load drifts over minutes; a pair of neighbouring runs shares it,
    so the ratio within a pair is what the policy changed, and the median over pairs drops a
    pair that a burst of load hit unevenly.
    """
    def median_step(run: dict) -> float:
        return statistics.median(run["step_times_s"][WARMUP_STEPS:])

    return statistics.median(median_step(t) / median_step(s) for s, t in zip(stock, tencache, strict=True))


def plot(result: dict, runs: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (times, losses) = plt.subplots(1, 2, figsize=(11, 4))
    for side in SIDES:
        for index, run in enumerate(runs[side]):
            times.plot(run["step_times_s"], label=f"{side} (run {index + 1})", alpha=0.8)
        losses.plot(runs[side][0]["losses"], label=side, linestyle="-" if side == "stock" else "--")
    times.set(title="step time (CPU parameter offload)", xlabel="step", ylabel="seconds")
    losses.set(title="loss (identical by construction)", xlabel="step", ylabel="loss")
    times.legend(fontsize=8)
    losses.legend(fontsize=8)
    cpu = result["modes"]["cpu"]
    fig.suptitle(f"{result['model']['size']}: tencache/stock step time {cpu['step_time_ratio']:.2f}, "
                 f"hit rate {cpu['tencache']['hit_rate']:.3f} vs {cpu['stock']['hit_rate']:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", help="tiny-model size (tiny, small, medium)")
    parser.add_argument("--steps", type=int, default=50, help="training steps per run (at least 50)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per side, interleaved")
    parser.add_argument("--out", type=Path, default=RESULTS / "tencache_train.json")
    parser.add_argument("--worker", choices=("stock", "tencache", "stock_default", "stock_measured"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.size, args.steps, args.out)
        return 0
    if args.steps < 50:
        parser.error("--steps must be at least 50 (the issue's comparison length)")
    from tqdm import tqdm

    scratch = args.out.parent / ".scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    order = [side for _ in range(args.repeats) for side in SIDES] + ["stock_default", "stock_measured"]
    runs: dict[str, list[dict]] = {side: [] for side in (*SIDES, "stock_default", "stock_measured")}
    for side in tqdm(order, desc="training runs", unit="run"):
        runs[side].append(spawn(side, args.size, args.steps, scratch))
    for leftover in scratch.iterdir():
        leftover.unlink()
    scratch.rmdir()

    stock = summarise(runs["stock"], runs["stock_measured"][0])
    tencache = summarise(runs["tencache"], None)
    first = runs["tencache"][0]
    result = {
        "model": {"size": args.size, "num_parameters": first["num_parameters"],
                  "param_bytes": first["num_parameters"] * 4, "dtype": "float32",
                  "device_budget_bytes": first["budget_bytes"], "steps": args.steps,
                  "repeats": args.repeats, "warmup_steps": WARMUP_STEPS,
                  "tencache_bytes_moved_per_step": first["bytes_moved_per_step"],
                  "stock_bytes_moved_per_step": runs["stock_measured"][0]["bytes_moved_per_step"]},
        "modes": {
            "cpu": {"stock": stock, "tencache": tencache,
                    "step_time_ratio": paired_ratio(runs["stock"], runs["tencache"]),
                    "losses_identical": all(r["losses"] == runs["stock"][0]["losses"]
                                            for r in runs["tencache"] + runs["stock"]),
                    "stock_default_step_time_median_s":
                        summarise(runs["stock_default"], None)["step_time_median_s"]},
            "nvme": None,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, runs, args.out.with_suffix(".png"))

    cpu = result["modes"]["cpu"]
    print(f"\n{args.size} Llama, {first['num_parameters']:,} parameters, {args.steps} steps x "
          f"{args.repeats} runs per side, device budget {first['budget_bytes'] / 2**20:.1f} MiB "
          f"(half the fp32 parameters)")
    print(f"{'mode cpu':<12}{'step median':>14}{'hit rate':>10}{'wait/step':>12}{'peak RSS':>12}")
    for side in SIDES:
        figures = cpu[side]
        print(f"{side:<12}{figures['step_time_median_s'] * 1e3:>11.1f} ms{figures['hit_rate']:>10.3f}"
              f"{figures['fetch_wait_s_per_step'] * 1e3:>9.2f} ms{figures['peak_rss_bytes'] / 2**20:>8.0f} MiB")
    print(f"step time ratio tencache/stock (median of {args.repeats} back-to-back pairs): "
          f"{cpu['step_time_ratio']:.3f}; "
          f"losses identical: {cpu['losses_identical']}; stock with DeepSpeed's defaults (whole "
          f"model live): {cpu['stock_default_step_time_median_s'] * 1e3:.1f} ms")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
