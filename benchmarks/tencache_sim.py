"""Projected GPU-scale step times of stock ZeRO-Infinity and TenCache, set beside the 10Cache paper.

    .venv/bin/python benchmarks/tencache_sim.py        # writes benchmarks/results/tencache_sim.{json,png}

Each 6B+ model is profiled on the meta device (cached), then replayed by ``ds_tencache.sim`` on the
A100-40GB preset under the ZeRO-Infinity config below (parameters and optimizer states on NVMe,
DeepSpeed's defaults otherwise). Calibration replays the tiny model that
``benchmarks/tencache_train.py`` really trained, on a hardware model measured on this machine,
against the step times recorded in ``benchmarks/results/tencache_train.json`` (not re-run here).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ds_tencache.hardware import A100_40GB, PRESETS, measure_host  # noqa: E402
from ds_tencache.model_profiles import MODEL_CONFIGS, load_or_profile  # noqa: E402
from ds_tencache.sim import (StockSettings, Trace, lower_bound, simulate_stock,  # noqa: E402
                             simulate_tencache)

RESULTS = ROOT / "benchmarks" / "results"
TRAIN_RESULTS = RESULTS / "tencache_train.json"
# Micro-batch and sequence length of the projection: 4 x 1024 tokens fits the A100-40GB's
# activation memory under checkpointing for every model here.
BATCH, SEQ_LEN = 4, 1024
# ZeRO-Infinity as the paper's baseline runs it: parameters and optimizer states on NVMe.
# buffer_size must hold the largest parameter (BLOOM's 250880 x 4096 embedding, 1.03e9 elements):
# DeepSpeed refuses a smaller one, so it is the smallest config stock can run with.
ZERO_INFINITY_CONFIG = {
    "train_micro_batch_size_per_gpu": BATCH,
    "bf16": {"enabled": True},
    "zero_optimization": {
        "stage": 3,
        "offload_param": {"device": "nvme", "nvme_path": "/local_nvme", "buffer_count": 5,
                          "buffer_size": int(1.1e9)},
        "offload_optimizer": {"device": "nvme", "nvme_path": "/local_nvme"},
    },
}
# The 10Cache artifact's figures (training time, seconds; GPU hit rate ranges).
PAPER_TIME_S = {"OPT-6.7B": (4469, 1758), "BLOOM-7B1": (9445, 3436), "Falcon-7B": (27672, 10582)}
PAPER_HIT_RATE = {"stock": (0.01, 0.17), "tencache": (0.84, 1.00)}
# The calibration run's shape (benchmarks/tencache_train.py via training_run.train defaults).
CALIBRATION_SIZE, CALIBRATION_BATCH, CALIBRATION_SEQ = "small", 4, 64
# Timed forward + backward passes of the calibration model; the first is a warm-up.
CALIBRATION_REPEATS = 6
CALIBRATION_CONFIG = ROOT / "configs" / "zero3_cpu_offload.json"


def project(name: str, hardware) -> dict:
    """One model on one machine: stock as configured, stock with its pipelined optimizer swapper,
    TenCache, and the lower bound."""
    trace = Trace.from_model_profile(load_or_profile(name, BATCH, SEQ_LEN))
    settings = StockSettings.from_ds_config(ZERO_INFINITY_CONFIG)
    stock = simulate_stock(trace, hardware, settings)
    pipelined = simulate_stock(trace, hardware, StockSettings.from_ds_config(pipelined_config()))
    tencache = simulate_tencache(trace, hardware, settings)
    figures = lambda r: {"step_time_s": r.step_time_s, "hit_rate": r.hit_rate,  # noqa: E731
                         "gpu_mem_util": r.gpu_mem_util, "cpu_mem_util": r.cpu_mem_util,
                         "forward_backward_s": r.forward_backward_s, "optimizer_s": r.optimizer_s,
                         "bytes_moved": r.bytes_moved}
    return {"params": sum(trace.numel.values()), "stock": figures(stock),
            "stock_pipelined": figures(pipelined),
            "tencache": figures(tencache), "lower_bound_s": lower_bound(trace, hardware, settings),
            "speedup": stock.step_time_s / tencache.step_time_s,
            "speedup_vs_pipelined": pipelined.step_time_s / tencache.step_time_s}


def pipelined_config() -> dict:
    """ZERO_INFINITY_CONFIG with DeepSpeed's pipelined optimizer swapper (``pipeline_read`` and
    ``pipeline_write``): the strongest stock setting for the optimizer's NVMe traffic."""
    config = json.loads(json.dumps(ZERO_INFINITY_CONFIG))
    config["zero_optimization"]["offload_optimizer"].update(pipeline_read=True, pipeline_write=True)
    return config


def calibrate() -> dict:
    """Simulate the real CPU benchmark's run and compare with its measured step medians."""
    from transformers import AutoConfig

    from tiny_llama import ensure_model

    measured_run = json.loads(TRAIN_RESULTS.read_text())
    model = measured_run["model"]
    budget = model["device_budget_bytes"]
    config = json.loads(CALIBRATION_CONFIG.read_text())
    zero = config["zero_optimization"]
    # The benchmark's stock side: max live and reuse distance set to the budget in fp32 elements.
    zero["stage3_max_live_parameters"] = budget // 4
    zero["stage3_max_reuse_distance"] = budget // 4
    settings = StockSettings.from_ds_config(config)
    model_config = AutoConfig.from_pretrained(ensure_model(CALIBRATION_SIZE))
    profile = load_or_profile(f"tiny-{CALIBRATION_SIZE}", CALIBRATION_BATCH, CALIBRATION_SEQ,
                              dtype="float32", config=model_config)
    trace = Trace.from_model_profile(profile)
    # No accelerator: "device" memory is host memory, so neither bound binds; the policies
    # differ only by the budget the benchmark gave TenCache.
    host = measure_host(gpu_mem_bytes=2**40, pinned_cpu_bytes=2**40, group_overhead_s=0.0)
    # At hidden size 512 and 256 tokens the non-GEMM ops (norms, softmax, SiLU, loss) are a large
    # share of the step, so a pure GEMM rate overstates the speed: the compute rate used is the
    # one measured running this very model's forward and backward in plain PyTorch (no ZeRO-3).
    gemm_flops = host.peak_flops
    host = replace(host, peak_flops=_model_flops_per_s(ensure_model(CALIBRATION_SIZE), sum(profile.flops)))
    trace = Trace(trace.groups, trace.backward, trace.flops, trace.numel, trace.nbytes, 0)
    stock = simulate_stock(trace, host, settings)
    tencache = simulate_tencache(trace, host, settings, budget_bytes=budget)
    measured = {side: measured_run["modes"]["cpu"][side]["step_time_median_s"]
                for side in ("stock", "tencache")}
    simulated = {"stock": stock.step_time_s, "tencache": tencache.step_time_s}
    error = max(abs(simulated[s] - measured[s]) / measured[s] for s in measured)
    return {"model": f"tiny_llama {CALIBRATION_SIZE} ({model['num_parameters']:,} params, fp32, "
                     f"batch {CALIBRATION_BATCH} x {CALIBRATION_SEQ})",
            "measured_step_s": measured, "simulated_step_s": simulated, "relative_error": error,
            "host": asdict(host), "host_gemm_flops_per_s": gemm_flops}


def _model_flops_per_s(model_dir: Path, flops_per_step: float) -> float:
    """FLOP/s of the calibration model's own forward + backward, measured in plain PyTorch."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    batch = torch.randint(0, model.config.vocab_size, (CALIBRATION_BATCH, CALIBRATION_SEQ))
    times = []
    for _ in range(CALIBRATION_REPEATS):
        start = time.perf_counter()
        model(input_ids=batch, labels=batch).loss.backward()
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return flops_per_step / min(times[1:])


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["models"])
    fig, (speed, hits) = plt.subplots(1, 2, figsize=(12, 4.5))
    xs = range(len(names))
    projected = [result["models"][n]["speedup"] for n in names]
    paper = [PAPER_TIME_S[n][0] / PAPER_TIME_S[n][1] if n in PAPER_TIME_S else 0 for n in names]
    bound = [result["models"][n]["stock"]["step_time_s"] / result["models"][n]["lower_bound_s"]
             for n in names]
    width = 0.27
    speed.bar([x - width for x in xs], projected, width, label="projected (sim)")
    speed.bar(list(xs), paper, width, label="10Cache paper (measured)")
    speed.bar([x + width for x in xs], bound, width, label="stock / lower bound")
    speed.axhline(2.5, color="grey", linestyle=":", label="target 2.5x")
    speed.set_xticks(list(xs), names, rotation=20)
    speed.set(title="speedup over stock ZeRO-Infinity", ylabel="x")
    speed.legend(fontsize=8)
    for side, colour in (("stock", "tab:red"), ("tencache", "tab:green")):
        hits.plot(names, [result["models"][n][side]["hit_rate"] for n in names], "o-",
                  color=colour, label=f"{side} (sim)")
        low, high = PAPER_HIT_RATE[side]
        hits.axhspan(low, high, color=colour, alpha=0.12, label=f"{side} (paper range)")
    hits.set(title="GPU hit rate", ylim=(0, 1.05))
    hits.tick_params(axis="x", rotation=20)
    hits.legend(fontsize=8)
    fig.suptitle(f"{result['hardware']['name']}, batch {BATCH} x {SEQ_LEN}, ZeRO-Infinity NVMe offload")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "tencache_sim.json")
    args = parser.parse_args(argv)
    from tqdm import tqdm

    started = time.perf_counter()
    hardware = A100_40GB
    models = {}
    other = {}
    for name in tqdm(list(MODEL_CONFIGS), desc="profile + simulate", unit="model"):
        models[name] = project(name, hardware)
        other[name] = {key: project(name, preset)["speedup"] for key, preset in PRESETS.items()
                       if preset is not hardware}
    calibration = calibrate()
    result = {"hardware": asdict(hardware), "models": models, "calibration": calibration}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out.with_suffix(".png"))

    print(f"\n{hardware.name}, batch {BATCH} x {SEQ_LEN} tokens, ZeRO-Infinity (params + optimizer "
          f"on NVMe) vs TenCache")
    header = (f"{'model':<12}{'params':>8}{'stock s':>9}{'tencache s':>11}{'bound s':>9}"
              f"{'speedup':>8}{'tc/bound':>9}{'hit stock':>10}{'hit tc':>8}{'paper x':>8}"
              + "".join(f"{'x ' + k:>12}" for k in other[next(iter(other))]))
    print(header)
    for name, m in models.items():
        paper = PAPER_TIME_S.get(name)
        print(f"{name:<12}{m['params'] / 1e9:>7.2f}B{m['stock']['step_time_s']:>9.2f}"
              f"{m['tencache']['step_time_s']:>11.2f}{m['lower_bound_s']:>9.2f}{m['speedup']:>8.2f}"
              f"{m['tencache']['step_time_s'] / m['lower_bound_s']:>9.2f}"
              f"{m['stock']['hit_rate']:>10.2f}{m['tencache']['hit_rate']:>8.2f}"
              f"{(paper[0] / paper[1]) if paper else float('nan'):>8.2f}"
              + "".join(f"{v:>12.2f}" for v in other[name].values()))
    c = calibration
    print(f"calibration, {c['model']}: measured stock {c['measured_step_s']['stock'] * 1e3:.1f} ms, "
          f"tencache {c['measured_step_s']['tencache'] * 1e3:.1f} ms; simulated stock "
          f"{c['simulated_step_s']['stock'] * 1e3:.1f} ms, tencache "
          f"{c['simulated_step_s']['tencache'] * 1e3:.1f} ms; relative error {c['relative_error']:.3f}")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')} in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
