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
- ``host_memory`` (nvme mode only): stock with the same bf16 model kept in host memory
  (``offload_param.device: "cpu"``), no NVMe at all: the floor any NVMe policy can approach,
  recorded as ``host_memory_step_time_median_s``;
- ``stock_measured``: the tencache coordinator kept in its profiling phase for the whole run,
  which executes stock ZeRO-3's code paths unchanged and counts hits and waits: stock's hit rate
  and fetch wait come from here, its step times from the uninstrumented ``stock`` runs.

Mode ``nvme``: stock ZeRO-Infinity with NVMe parameter offload in bf16 (fp32 fails on the CPU
accelerator, an upstream operator-precedence slip), ``max_in_cpu: 0`` so stock really swaps,
and ``stage3_prefetch_bucket_size: 0``: with stock's default bucket, DeepSpeed 0.19.8 fails here
with "param N already assigned swap buffer id M" (its prefetch and its NVMe swap-in both claim a
buffer). Its swap buffers are ``buffer_count`` x ``buffer_size`` with ``buffer_size`` the largest
parameter, the least stock accepts.

Equal host memory in this mode: stock holds parameters between uses in pinned host memory in two
places, its swap slots and the partitions under 1 MiB that it never swaps (pinned, ``pin_memory:
true``). tencache's whole pool (``cpu_budget``: CPU-tier residents and NVMe staging buffers
together) gets exactly the sum of the two, so the rest of the model lives on NVMe and is read back
every step. Stock also pins a write-back buffer as large as its largest optimizer sub-group (here
the whole model) for the optimizer step; tencache streams that write-back through its pool
instead. ``pinned_bytes_reserved`` is every pinned byte a side holds for parameters (stock: slots,
write-back buffer and pinned partitions, each also reported); utilisation is the in-use peak over
the reserved bytes of the pool (stock: its slots, sampled at every fetch).

Workloads (``--nvme-workloads``, micro-batch x sequence length). The NVMe mode runs each, every one
with its own pairs and its own host-memory floor, so the JSON's ``by_workload`` shows how the
ratio moves with the compute in a step. No policy can beat the floor, and the floor is mostly
compute: on these two CPU cores even 32 tokens of forward and backward take most of stock's NVMe
step (the floor measured 0.59-0.85x stock across workloads and runs). A step of ZeRO-Infinity on
a GPU is the other way round, little compute beside the data it moves (``tencache_sim.py``'s 7B
profiles: forward and backward 3.4-4.2 s of a 53-57 s stock step), and the fewest tokens per step
here come nearest to that. The headline ``modes.nvme`` is therefore the first workload, 1 x 32;
the 1 x 64 and 4 x 64 rows are reported beside it, never dropped. ``pair_ratios`` keeps every
pair's ratio, so the spread behind each median is on record.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
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


# (micro-batch, sequence length) of the CPU mode and of training_run.train's default batches.
DEFAULT_WORKLOAD = (4, 64)
# NVMe mode runs these, the first being the headline (module doc, "Workloads").
NVME_WORKLOADS = "1x32,1x64,4x64"
STOCK_SWAP_BUFFERS = 5  # offload_param.buffer_count default
STOCK_SWAP_MIN_BYTES = 2**20  # ZeRO-Infinity never swaps a partition smaller (MIN_AIO_BYTES)


def itemsize(mode: str) -> int:
    return 2 if mode == "nvme" else 4


def stock_pinned_parameter_bytes(model_dir: Path, largest_numel: int) -> int:
    """Pinned bytes in which stock holds parameters with NVMe offload (module doc): its swap slots
    plus every bf16 partition under ZeRO-Infinity's 1 MiB swap threshold."""
    from safetensors import safe_open

    with safe_open(model_dir / "model.safetensors", framework="pt") as weights:
        numels = [weights.get_slice(name).get_shape() for name in weights.keys()]
    unswapped = sum(n * 2 for n in (math.prod(shape) for shape in numels) if n * 2 < STOCK_SWAP_MIN_BYTES)
    return STOCK_SWAP_BUFFERS * largest_numel * 2 + unswapped


def run_config(mode: str, side: str, budget: int, steps: int, largest_numel: int,
               swap_dir: Path, cpu_budget: int | None = None) -> dict:
    config = json.loads(BASE_CONFIG.read_text())
    zero = config["zero_optimization"]
    if mode == "nvme":
        config["bf16"] = {"enabled": True}
        zero["offload_param"] = {"device": "nvme", "nvme_path": str(swap_dir), "pin_memory": True,
                                 "max_in_cpu": 0, "buffer_count": STOCK_SWAP_BUFFERS,
                                 "buffer_size": largest_numel}
        zero["stage3_prefetch_bucket_size"] = 0
        if side == "host_memory":
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if side in ("stock", "stock_measured", "host_memory"):
        # Equal device memory: stock may keep at most the budget live (prefetch limit) and
        # releases what is not reused within it (stock's own two knobs, in elements).
        zero["stage3_max_live_parameters"] = budget // itemsize(mode)
        zero["stage3_max_reuse_distance"] = budget // itemsize(mode)
    if side == "tencache":
        config["tencache"] = {"device_budget": budget, "warmup_steps": WARMUP_STEPS}
        if mode == "nvme":
            config["tencache"]["cpu_budget"] = cpu_budget
    elif side == "stock_measured":
        # the tencache coordinator, profiling all run long, over stock's own swapper
        config["tencache"] = {"device_budget": budget, "warmup_steps": steps + 1, "nvme_tier": False}
    return config


def storage_read_bytes() -> int:
    """Bytes this process has read from storage (not the page cache): NVMe swap-ins."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def parse_workloads(text: str) -> list[tuple[int, int]]:
    """``"1x32,4x64"`` -> [(1, 32), (4, 64)]: micro-batch x sequence length per workload."""
    workloads = []
    for item in text.split(","):
        batch, _, seq = item.strip().partition("x")
        if not (batch.isdigit() and seq.isdigit() and int(batch) > 0 and int(seq) > 1):
            raise ValueError(f"workload {item!r}: write it as MICRO_BATCHxSEQ_LEN, e.g. 1x32")
        workloads.append((int(batch), int(seq)))
    return workloads


def worker(mode: str, side: str, size: str, steps: int, out: Path,
           workload: tuple[int, int] = DEFAULT_WORKLOAD) -> None:
    """One training run in this process; writes its figures to ``out``."""
    from tiny_llama.environment import apply_runtime_defaults

    apply_runtime_defaults()
    import ds_tencache
    from ds_tencache.training_run import train
    from tiny_llama import ensure_model

    model_dir = ensure_model(size)
    manifest = json.loads((model_dir / "manifest.json").read_text())
    spec = manifest["spec"]
    budget = manifest["num_parameters"] * itemsize(mode) // 2
    largest = max(spec["vocab_size"] * spec["hidden_size"], spec["hidden_size"] * spec["intermediate_size"])
    swap_dir = out.parent / f"swap-{out.stem}"
    cpu_budget = stock_pinned_parameter_bytes(model_dir, largest) if mode == "nvme" else None
    config = run_config(mode, side, budget, steps, largest, swap_dir, cpu_budget)
    micro_batch, seq_len = workload
    config["train_micro_batch_size_per_gpu"] = micro_batch
    read_before = storage_read_bytes()
    result = train(model_dir, config, steps=steps, seq_len=seq_len,
                   initialize=ds_tencache.initialize if side in ("tencache", "stock_measured")
                   else None)
    nvme_read = storage_read_bytes() - read_before
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
        "bytes_read_nvme_per_step": nvme_read / steps if mode == "nvme" else None,
        "host_tier": result.host_tier,
    }))


def spawn(mode: str, side: str, size: str, steps: int, scratch: Path,
          workload: tuple[int, int] = DEFAULT_WORKLOAD) -> dict:
    out = scratch / f"{mode}-{side}-{os.getpid()}-{len(list(scratch.iterdir()))}.json"
    command = [sys.executable, __file__, "--worker", side, "--mode", mode, "--size", size,
               "--steps", str(steps), "--out", str(out), "--workload", "%dx%d" % workload]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise SystemExit(f"{mode} {side} run failed (exit {done.returncode}); its output is above")
    return json.loads(out.read_text())


def summarise(runs: list[dict], measured: dict | None) -> dict:
    """Median step time over the post-warm-up steps of every run of one side.

    Hit rate, fetch wait and the sampled in-use peak of stock's swap slots come from ``measured``
    (the instrumented run) when given; everything else from the side's own runs.
    """
    times = [t for run in runs for t in run["step_times_s"][WARMUP_STEPS:]]
    figures = measured if measured is not None else runs[0]
    tier = runs[0].get("host_tier") or {}  # None without NVMe offload
    watched = (measured or {}).get("host_tier") or tier
    return {
        "step_time_median_s": statistics.median(times),
        "hit_rate": figures["hit_rate"],
        "fetch_wait_s_per_step": figures["fetch_wait_s_per_step"],
        "losses": runs[0]["losses"],
        "pinned_bytes_reserved": tier.get("pinned_bytes_reserved"),
        "pinned_bytes_used_peak": watched.get("pinned_bytes_used_peak"),
        "allocations_after_warmup": tier.get("allocations_after_warmup"),
        "bytes_read_nvme_per_step": runs[0]["bytes_read_nvme_per_step"],
        "peak_rss_bytes": max(run["peak_rss_bytes"] for run in runs),
        **{key: watched.get(key) for key in ("utilisation", "pinned_swap_slot_bytes",
                                             "pinned_write_back_bytes", "pinned_partition_bytes",
                                             "cpu_resident_bytes", "device_budget_bytes")
           if key in watched},
    }


# Per mode, the runs beside the A/B that set it in context (see the module doc).
REFERENCE_SIDES = {"cpu": ("stock_default",), "nvme": ("host_memory",)}


def run_plan(modes: list[str], repeats: int, references: bool = True) -> list[tuple[str, str]]:
    """(mode, side) in run order: stock and tencache alternating ``repeats`` times, then the
    reference runs (unless ``references`` is false), then one ``stock_measured`` run."""
    order = []
    for mode in modes:
        order += [(mode, side) for _ in range(repeats) for side in SIDES]
        if references:
            order += [(mode, side) for side in REFERENCE_SIDES[mode]]
        order.append((mode, "stock_measured"))
    return order


def pair_ratios(stock: list[dict], tencache: list[dict]) -> list[float]:
    """Per back-to-back run pair, tencache's median step time over stock's, in run order."""
    def median_step(run: dict) -> float:
        return statistics.median(run["step_times_s"][WARMUP_STEPS:])

    return [median_step(t) / median_step(s) for s, t in zip(stock, tencache, strict=True)]


def paired_ratio(stock: list[dict], tencache: list[dict]) -> float:
    """Median of :func:`pair_ratios`.

    The machine's background load drifts over minutes; a pair of neighbouring runs shares it,
    so the ratio within a pair is what the policy changed, and the median over pairs drops a
    pair that a burst of load hit unevenly.
    """
    return statistics.median(pair_ratios(stock, tencache))


def compare_sides(mode: str, runs: dict[str, list[dict]]) -> dict:
    """One mode's result: both sides summarised, their paired step-time ratio, whether every run's
    losses are identical, and the median step time of each reference run made."""
    stock, tencache = runs["stock"], runs["tencache"]
    return {
        "stock": summarise(stock, runs["stock_measured"][0]),
        "tencache": summarise(tencache, None),
        "step_time_ratio": paired_ratio(stock, tencache),
        "pair_ratios": pair_ratios(stock, tencache),
        "losses_identical": all(r["losses"] == stock[0]["losses"] for r in tencache + stock),
        **{f"{side}_step_time_median_s": summarise(runs[side], None)["step_time_median_s"]
           for side in REFERENCE_SIDES[mode] if side in runs},
    }


def workload_figures(workload: tuple[int, int]) -> dict:
    micro_batch, seq_len = workload
    return {"micro_batch": micro_batch, "seq_len": seq_len, "tokens_per_step": micro_batch * seq_len}


def workload_row(workload: tuple[int, int], figures: dict) -> dict:
    """One NVMe workload's line of the sweep: both sides' step times, tencache's ratio to stock
    and the host-memory floor's, so a reader sees how far below stock any policy could go."""
    stock, floor = figures["stock"]["step_time_median_s"], figures["host_memory_step_time_median_s"]
    return {**workload_figures(workload),
            "stock_step_time_median_s": stock,
            "tencache_step_time_median_s": figures["tencache"]["step_time_median_s"],
            "host_memory_step_time_median_s": floor,
            "step_time_ratio": figures["step_time_ratio"],
            "pair_ratios": figures["pair_ratios"],
            "host_memory_ratio": floor / stock,
            "tencache_over_host_memory": figures["tencache"]["step_time_median_s"] / floor,
            "stock_fetch_wait_s_per_step": figures["stock"]["fetch_wait_s_per_step"],
            "tencache_fetch_wait_s_per_step": figures["tencache"]["fetch_wait_s_per_step"],
            "losses_identical": figures["losses_identical"]}


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


def plot_pool(result: dict, path: Path) -> None:
    """Pinned bytes reserved against the most in use at once, per side (NVMe mode)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nvme = result["modes"]["nvme"]
    stock, ours = nvme["stock"], nvme["tencache"]
    fig, (axis, sweep) = plt.subplots(1, 2, figsize=(13, 4), width_ratios=(3, 2))
    tokens = [row["tokens_per_step"] for row in nvme["by_workload"]]
    sweep.plot(tokens, [row["step_time_ratio"] for row in nvme["by_workload"]], "o-",
               label="tencache / stock (median of pairs)")
    sweep.scatter([row["tokens_per_step"] for row in nvme["by_workload"] for _ in row["pair_ratios"]],
                  [ratio for row in nvme["by_workload"] for ratio in row["pair_ratios"]],
                  s=12, color="#1f77b4", alpha=0.35, label="each back-to-back pair")
    sweep.plot(tokens, [row["host_memory_ratio"] for row in nvme["by_workload"]], "s--",
               label="host-memory floor / stock")
    sweep.axhline(0.75, color="#999999", linewidth=0.8, label="target 0.75")
    sweep.set(xscale="log", xticks=tokens, xticklabels=[str(t) for t in tokens],
              xlabel="tokens per step", ylabel="step time vs stock",
              title="NVMe offload step time by workload")
    sweep.minorticks_off()
    sweep.legend(fontsize=8)
    bars = [("stock: swap slots", stock["pinned_swap_slot_bytes"], stock["pinned_bytes_used_peak"]),
            ("stock: all pinned for parameters\n(slots, write-back, partitions < 1 MiB)",
             stock["pinned_bytes_reserved"], None),
            ("tencache: pool (everything)", ours["pinned_bytes_reserved"],
             ours["pinned_bytes_used_peak"])]
    names = [name for name, *_ in bars]
    axis.barh(names, [(reserved or 0) / 2**20 for _, reserved, _ in bars], color="#bbbbbb",
              label="reserved")
    axis.barh(names, [(used or 0) / 2**20 for _, _, used in bars], height=0.4, color="#1f77b4",
              label="in use at peak")
    axis.set(xlabel="MiB pinned", title=f"NVMe offload, {result['model']['size']} model (bf16)\n"
             f"utilisation: tencache pool {ours.get('utilisation', 0):.2f}, stock slots "
             f"{stock.get('utilisation') or 0:.2f}")
    axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", help="tiny-model size (tiny, small, medium)")
    parser.add_argument("--steps", type=int, default=50, help="training steps per run (at least 50)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per side, interleaved")
    parser.add_argument("--out", type=Path, default=RESULTS / "tencache_train.json")
    parser.add_argument("--modes", default="cpu,nvme", help="comma-separated: cpu, nvme")
    parser.add_argument("--worker", choices=("stock", "tencache", "stock_default", "stock_measured",
                                             "host_memory"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--nvme-workloads", default=NVME_WORKLOADS,
                        help="NVMe mode's workloads, MICRO_BATCHxSEQ_LEN, comma-separated; the first "
                             "is the headline (default %(default)s)")
    parser.add_argument("--mode", choices=("cpu", "nvme"), default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--workload", default="%dx%d" % DEFAULT_WORKLOAD, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        nvme_workloads = parse_workloads(args.nvme_workloads)
        workload = parse_workloads(args.workload)[0]
    except ValueError as error:
        parser.error(str(error))
    if args.worker:
        worker(args.mode, args.worker, args.size, args.steps, args.out, workload)
        return 0
    modes = args.modes.split(",")
    if args.steps < 50:
        parser.error("--steps must be at least 50 (the issue's comparison length)")
    if not set(modes) <= {"cpu", "nvme"}:
        parser.error(f"--modes {args.modes!r}: choose from cpu, nvme")
    from tqdm import tqdm

    scratch = args.out.parent / ".scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    # (mode, workload) and side, in run order: the CPU mode runs the default workload only
    planned = [((mode, load), side)
               for mode in modes for load in (nvme_workloads if mode == "nvme" else [DEFAULT_WORKLOAD])
               for _, side in run_plan([mode], args.repeats)]
    runs: dict[tuple[str, tuple[int, int]], dict[str, list[dict]]] = {}
    for (mode, load), side in tqdm(planned, desc="training runs", unit="run"):
        runs.setdefault((mode, load), {}).setdefault(side, []).append(
            spawn(mode, side, args.size, args.steps, scratch, load))
    shutil.rmtree(scratch)

    result = {"model": {"size": args.size, "steps": args.steps, "repeats": args.repeats,
                        "warmup_steps": WARMUP_STEPS},
              "modes": {"cpu": None, "nvme": None}}
    cpu_runs = runs.get(("cpu", DEFAULT_WORKLOAD))
    if cpu_runs:
        first = cpu_runs["tencache"][0]
        result["model"].update({
            "num_parameters": first["num_parameters"], "param_bytes": first["num_parameters"] * 4,
            "dtype": "float32", "device_budget_bytes": first["budget_bytes"],
            "tencache_bytes_moved_per_step": first["bytes_moved_per_step"],
            "stock_bytes_moved_per_step": cpu_runs["stock_measured"][0]["bytes_moved_per_step"]})
        result["modes"]["cpu"] = {"workload": workload_figures(DEFAULT_WORKLOAD),
                                  **compare_sides("cpu", cpu_runs)}
    if "nvme" in modes:
        compared = {load: compare_sides("nvme", runs[("nvme", load)]) for load in nvme_workloads}
        headline = nvme_workloads[0]
        first = runs[("nvme", headline)]["stock"][0]
        result["model"].setdefault("num_parameters", first["num_parameters"])
        result["model"]["nvme"] = {"dtype": "bfloat16", "param_bytes": first["num_parameters"] * 2,
                                   "device_budget_bytes": first["budget_bytes"],
                                   "stock_buffer_count": STOCK_SWAP_BUFFERS}
        result["modes"]["nvme"] = {
            "workload": workload_figures(headline), **compared[headline],
            "by_workload": [workload_row(load, compared[load]) for load in nvme_workloads]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if cpu_runs:
        plot(result, cpu_runs, args.out.with_suffix(".png"))
    if "nvme" in modes:
        plot_pool(result, args.out.with_name(args.out.stem + "_pool.png"))
    print_table(result, args)
    return 0


def print_table(result: dict, args: argparse.Namespace) -> None:
    model = result["model"]
    print(f"\n{args.size} Llama, {model.get('num_parameters', 0):,} parameters, {args.steps} steps x "
          f"{args.repeats} runs per side, device budget half the parameter bytes")
    print(f"{'mode / side':<18}{'step median':>14}{'hit rate':>10}{'wait/step':>12}"
          f"{'NVMe read/step':>16}{'peak RSS':>12}")
    for mode, figures in result["modes"].items():
        for side in SIDES:
            row = (figures or {}).get(side)
            if row is None:
                print(f"{mode + ' ' + side:<18}{'(not measured yet)':>30}")
                continue
            nvme = row["bytes_read_nvme_per_step"]
            print(f"{mode + ' ' + side:<18}{row['step_time_median_s'] * 1e3:>11.1f} ms"
                  f"{row['hit_rate']:>10.3f}{row['fetch_wait_s_per_step'] * 1e3:>9.2f} ms"
                  f"{'-' if nvme is None else f'{nvme / 2**20:.1f} MiB':>16}"
                  f"{row['peak_rss_bytes'] / 2**20:>8.0f} MiB")
    nvme = result["modes"]["nvme"]
    if nvme:
        stock, ours = nvme["stock"], nvme["tencache"]
        print(f"nvme: step time ratio tencache/stock (median of {args.repeats} back-to-back pairs): "
              f"{nvme['step_time_ratio']:.3f}; losses identical: {nvme['losses_identical']}; pinned "
              f"reserved {ours['pinned_bytes_reserved'] / 2**20:.1f} MiB against stock's "
              f"{stock['pinned_bytes_reserved'] / 2**20:.1f} MiB (slots "
              f"{stock['pinned_swap_slot_bytes'] / 2**20:.1f}, write-back "
              f"{stock['pinned_write_back_bytes'] / 2**20:.1f}, partitions under 1 MiB "
              f"{stock['pinned_partition_bytes'] / 2**20:.1f}); pool utilisation "
              f"{ours['utilisation']:.3f} (stock's slots {stock['utilisation']:.3f}); allocations "
              f"after warm-up {ours['allocations_after_warmup']}; the same model in host memory "
              f"(no NVMe): {nvme['host_memory_step_time_median_s'] * 1e3:.1f} ms = "
              f"{nvme['host_memory_step_time_median_s'] / stock['step_time_median_s']:.3f}x stock")
        for row in nvme["by_workload"]:
            print(f"nvme, {row['micro_batch']} x {row['seq_len']} = {row['tokens_per_step']} tokens per "
                  f"step: stock {row['stock_step_time_median_s'] * 1e3:.1f} ms, tencache "
                  f"{row['tencache_step_time_median_s'] * 1e3:.1f} ms, ratio {row['step_time_ratio']:.3f} "
                  f"(pairs {', '.join(f'{r:.3f}' for r in row['pair_ratios'])}); "
                  f"host-memory floor {row['host_memory_ratio']:.3f}x stock, tencache "
                  f"{row['tencache_over_host_memory']:.3f}x the floor; losses identical: "
                  f"{row['losses_identical']}")
    cpu = result["modes"]["cpu"]
    if cpu:
        print(f"cpu: step time ratio tencache/stock (median of {args.repeats} back-to-back pairs): "
              f"{cpu['step_time_ratio']:.3f}; losses identical: {cpu['losses_identical']}; stock "
              f"with DeepSpeed's defaults (whole model live): "
              f"{cpu['stock_default_step_time_median_s'] * 1e3:.1f} ms")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    raise SystemExit(main())
