"""Projected GPU-scale step times of stock ZeRO-Infinity and TenCache, set beside the 10Cache paper.

    .venv/bin/python benchmarks/tencache_sim.py        # writes benchmarks/results/tencache_sim.{json,png}

Each 6B+ model is profiled on the meta device (cached), then replayed by ``ds_tencache.sim`` on the
A100-40GB preset under the ZeRO-Infinity config below (parameters and optimizer states on NVMe,
DeepSpeed's defaults otherwise). Calibration runs ``benchmarks/tencache_train.py``'s CPU-offload
A/B on the tiny model here (a few minutes), measures this machine's rates and ZeRO-3's own
per-fetch-group cost in the same run, and compares the simulated step times with the measured
ones. Run it under ``flock /tmp/cpu-heavy.lock`` on a shared machine: it times real training.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import tencache_train  # noqa: E402
from ds_tencache.hardware import (A100_40GB, PRESETS, HardwareModel, cpu_host,  # noqa: E402
                                  measure_memcpy_bytes_per_s)
from ds_tencache.model_profiles import MODEL_CONFIGS, load_or_profile  # noqa: E402
from ds_tencache.sim import (StockSettings, Trace, lower_bound, simulate_stock,  # noqa: E402
                             simulate_tencache)

RESULTS = ROOT / "benchmarks" / "results"
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
# Steps per measured training run: tencache_train.py's comparison length.
CALIBRATION_STEPS = 50
# Stock / tencache run pairs measured per benchmark run (each run is its own process, ~30 s).
CALIBRATION_PAIRS = 3
# The config tencache_train.py builds its CPU-offload runs from.
CALIBRATION_CONFIG = tencache_train.BASE_CONFIG
# Tokens fed to the ZeRO-3 overhead measurement: one sequence of two tokens (one next-token
# target, so the loss and the optimizer step are real), where compute is next to nothing.
OVERHEAD_TOKENS = 2
# Timed passes of each component measurement and the warm-up passes dropped before them.
OVERHEAD_STEPS, OVERHEAD_WARMUP = 20, 3
# A second overhead measurement fetches every parameter at every use (nothing kept live, no
# prefetch): set beside the default config's, it gives the host cost of one fetch. The
# calibrated runs' budgets sit between the two configurations, so neither is the one compared.
REFETCH_ZERO_SETTINGS = {"stage3_max_live_parameters": 0, "stage3_max_reuse_distance": 0,
                         "stage3_prefetch_bucket_size": 0}


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


def calibrate(pairs: int) -> dict:
    """Simulate the CPU benchmark's A/B and compare with the same A/B measured in this run.

    The measured side is ``tencache_train.py``'s own workers (same model, seed, batches, budget
    and configs), ``pairs`` stock/tencache runs interleaved. The simulated side uses rates
    measured on this machine in between those runs (:func:`calibration_host`), never fitted to
    the step times it is compared with.
    """
    from transformers import AutoConfig

    from tiny_llama import ensure_model

    model_config = AutoConfig.from_pretrained(ensure_model(CALIBRATION_SIZE))
    profile = load_or_profile(f"tiny-{CALIBRATION_SIZE}", CALIBRATION_BATCH, CALIBRATION_SEQ,
                              dtype="float32", config=model_config)
    tokenless = load_or_profile(f"tiny-{CALIBRATION_SIZE}", 1, OVERHEAD_TOKENS, dtype="float32",
                                config=model_config)
    # No accelerator: "device" memory is host memory and holds no activations that matter here.
    trace = replace(Trace.from_model_profile(profile), activation_bytes=0)
    runs, components = measure_training(pairs)
    host, derived = calibration_host(components, sum(profile.flops), Trace.from_model_profile(tokenless))
    budget = runs["tencache"][0]["budget_bytes"]
    # The stock side's exact config (the CPU mode has no swap folder or swap buffer size).
    stock_config = tencache_train.run_config("cpu", "stock", budget, CALIBRATION_STEPS,
                                             largest_numel=0, swap_dir=RESULTS)
    settings = StockSettings.from_ds_config(stock_config)
    stock = simulate_stock(trace, host, settings)
    tencache = simulate_tencache(trace, host, settings, budget_bytes=budget)
    measured = {side: tencache_train.summarise(runs[side], None)["step_time_median_s"]
                for side in tencache_train.SIDES}
    simulated = {"stock": stock.step_time_s, "tencache": tencache.step_time_s}
    error = max(abs(simulated[s] - measured[s]) / measured[s] for s in measured)
    return {"model": f"tiny_llama {CALIBRATION_SIZE} ({runs['stock'][0]['num_parameters']:,} params, "
                     f"fp32, batch {CALIBRATION_BATCH} x {CALIBRATION_SEQ})",
            "measured_step_s": measured, "simulated_step_s": simulated, "relative_error": error,
            "measured_pairs": pairs, "device_budget_bytes": budget,
            "simulated_parts_s": {side: {"forward_backward": r.forward_backward_s,
                                         "optimizer": r.optimizer_s, "fetches": r.fetches}
                                  for side, r in (("stock", stock), ("tencache", tencache))},
            "host": asdict(host), "components": {"measured": components, **derived}}


def calibration_host(components: list[dict], flops_per_step: float,
                     tokenless: Trace) -> tuple[HardwareModel, dict]:
    """This machine as the simulator sees it, from the medians of the measurements:

    - links: a memcpy (``measure_memcpy_bytes_per_s``): with no accelerator every link is host memory;
    - compute: the model's forward + backward in plain PyTorch at the calibration shape (its
      non-GEMM ops are a large share at this size, so a pure GEMM rate would overstate it);
    - ZeRO-3's own cost, from real stock engines on the same model fed ``OVERHEAD_TOKENS``
      tokens, where compute is next to nothing, so what remains after plain PyTorch's time and
      the transfers the simulator models itself is ZeRO-3's work that does not grow with tokens
      (hooks, gather bookkeeping, gradient reduction and partitioning). Two configurations that
      fetch different numbers of parameters (DeepSpeed's defaults; every use fetched) split it
      into a cost per fetch (``fetch_overhead_s``) and a cost per fetch group
      (``group_overhead_s``); the default engine's optimizer step (DeepSpeed's CPU Adam with the
      engine's norm and copies) gives the optimizer rate.
    """
    median = {key: statistics.median(c[key] for c in components) for key in components[0]}
    params = sum(tokenless.numel.values())
    host = cpu_host(measure_memcpy_bytes_per_s(), flops_per_step / median["plain_forward_backward_s"],
                    cpu_adam_params_per_s=params / median["zero3_step_s"])
    zero_flops = Trace(tokenless.groups, tokenless.backward, [0.0] * len(tokenless.flops),
                       tokenless.numel, tokenless.nbytes)
    default_config = json.loads(CALIBRATION_CONFIG.read_text())
    modelled = {name: simulate_stock(zero_flops, host, StockSettings.from_ds_config(config))
                for name, config in (("default", default_config),
                                     ("refetch", _refetch_config(default_config)))}
    measured = {"default": median["zero3_tokenless_forward_backward_s"],
                "refetch": median["zero3_refetch_tokenless_forward_backward_s"]}
    # What the simulator does not model already: measured minus the modelled transfers.
    unmodelled = {name: measured[name] - modelled[name].forward_backward_s for name in measured}
    per_fetch = max(0.0, (unmodelled["refetch"] - unmodelled["default"])
                    / (modelled["refetch"].fetches - modelled["default"].fetches))
    per_group = max(0.0, unmodelled["default"] - median["plain_tokenless_forward_backward_s"]
                    - per_fetch * modelled["default"].fetches) / len(tokenless.groups)
    host = replace(host, group_overhead_s=per_group, fetch_overhead_s=per_fetch)
    return host, {"median": median, "fetch_groups": len(tokenless.groups),
                  "modelled": {name: {"transfers_s": r.forward_backward_s, "fetches": r.fetches}
                               for name, r in modelled.items()}}


def _refetch_config(config: dict) -> dict:
    """``config`` with :data:`REFETCH_ZERO_SETTINGS`: every parameter fetched at every use."""
    config = json.loads(json.dumps(config))
    config["zero_optimization"].update(REFETCH_ZERO_SETTINGS)
    return config


def measure_training(pairs: int) -> tuple[dict[str, list[dict]], list[dict]]:
    """``pairs`` stock / tencache runs of ``tencache_train.py``'s CPU-offload A/B, each pair
    preceded by the component measurements (:func:`zero3_worker`), so that both see the same
    state of a shared machine."""
    from tqdm import tqdm

    scratch = RESULTS / ".scratch-sim"
    scratch.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {side: [] for side in tencache_train.SIDES}
    components = []
    for _ in tqdm(range(pairs), desc="calibration pairs", unit="pair"):
        components.append({**_run_zero3_worker(refetch=False), **_run_zero3_worker(refetch=True)})
        for side in tencache_train.SIDES:
            runs[side].append(tencache_train.spawn("cpu", side, CALIBRATION_SIZE, CALIBRATION_STEPS,
                                                   scratch))
    shutil.rmtree(scratch)
    return runs, components


def _plain_step_s(model_dir: Path, batch: int, seq_len: int) -> float:
    """Median forward + backward time of the model in plain PyTorch (no ZeRO-3), warm-up dropped."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len))
    times = []
    for _ in range(OVERHEAD_WARMUP + OVERHEAD_STEPS):
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return statistics.median(times[OVERHEAD_WARMUP:])


def _run_zero3_worker(refetch: bool) -> dict:
    """:func:`zero3_worker` in its own process: DeepSpeed's process group stays out of this one."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "zero3.json"
        done = subprocess.run([sys.executable, __file__, "--zero3-worker", str(out)]
                              + (["--refetch"] if refetch else []), capture_output=True, text=True)
        if done.returncode != 0:
            sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
            raise SystemExit(f"ZeRO-3 overhead worker failed (exit {done.returncode}); output above")
        return json.loads(out.read_text())


def zero3_worker(out: Path, refetch: bool) -> None:
    """The component timings of one process. A stock ZeRO-3 engine (the calibration config,
    DeepSpeed's defaults otherwise, or with :data:`REFETCH_ZERO_SETTINGS`) at
    ``OVERHEAD_TOKENS`` tokens: forward + backward; with the default config also its optimizer
    step and plain PyTorch at the calibration shape and at ``OVERHEAD_TOKENS`` tokens."""
    from tiny_llama.environment import apply_runtime_defaults

    apply_runtime_defaults()
    import deepspeed
    import torch
    from deepspeed.accelerator import get_accelerator
    from transformers import AutoModelForCausalLM

    from ds_tencache.training_run import ensure_single_process_env
    from tiny_llama import ensure_model

    model_dir = ensure_model(CALIBRATION_SIZE)
    figures = {} if refetch else {
        "plain_forward_backward_s": _plain_step_s(model_dir, CALIBRATION_BATCH, CALIBRATION_SEQ),
        "plain_tokenless_forward_backward_s": _plain_step_s(model_dir, 1, OVERHEAD_TOKENS)}
    config = json.loads(CALIBRATION_CONFIG.read_text())
    ensure_single_process_env()
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=_refetch_config(config) if refetch else config)
    ids = torch.randint(0, model.config.vocab_size, (1, OVERHEAD_TOKENS))
    forward_backward, step = [], []
    for _ in range(OVERHEAD_WARMUP + OVERHEAD_STEPS):
        start = time.perf_counter()
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        middle = time.perf_counter()
        engine.step()
        forward_backward.append(middle - start)
        step.append(time.perf_counter() - middle)
    engine.destroy()
    if refetch:
        figures["zero3_refetch_tokenless_forward_backward_s"] = statistics.median(
            forward_backward[OVERHEAD_WARMUP:])
    else:
        figures["zero3_tokenless_forward_backward_s"] = statistics.median(forward_backward[OVERHEAD_WARMUP:])
        figures["zero3_step_s"] = statistics.median(step[OVERHEAD_WARMUP:])
    out.write_text(json.dumps(figures))


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
    parser.add_argument("--pairs", type=int, default=CALIBRATION_PAIRS,
                        help="stock/tencache training-run pairs measured for the calibration")
    parser.add_argument("--zero3-worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--refetch", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.zero3_worker:
        zero3_worker(args.zero3_worker, args.refetch)
        return 0
    from tqdm import tqdm

    started = time.perf_counter()
    hardware = A100_40GB
    models = {}
    other = {key: {"hardware": asdict(preset), "models": {}} for key, preset in PRESETS.items()
             if preset is not hardware}
    for name in tqdm(list(MODEL_CONFIGS), desc="profile + simulate", unit="model"):
        models[name] = project(name, hardware)
        for key in other:
            projected = project(name, PRESETS[key])
            other[key]["models"][name] = {
                "speedup": projected["speedup"], "speedup_vs_pipelined": projected["speedup_vs_pipelined"],
                "tencache_over_bound": projected["tencache"]["step_time_s"] / projected["lower_bound_s"]}
    calibration = calibrate(args.pairs)
    result = {"hardware": asdict(hardware), "models": models, "other_hardware": other,
              "calibration": calibration}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out.with_suffix(".png"))

    print(f"\n{hardware.name}, batch {BATCH} x {SEQ_LEN} tokens, ZeRO-Infinity (params + optimizer "
          f"on NVMe) vs TenCache")
    header = (f"{'model':<12}{'params':>8}{'stock s':>9}{'pipel. s':>9}{'tencache s':>11}{'bound s':>9}"
              f"{'speedup':>8}{'vs pipel.':>10}{'tc/bound':>9}{'hit stock':>10}{'hit tc':>8}{'paper x':>8}"
              + "".join(f"{'x ' + k:>12}" for k in other))
    print(header)
    for name, m in models.items():
        paper = PAPER_TIME_S.get(name)
        print(f"{name:<12}{m['params'] / 1e9:>7.2f}B{m['stock']['step_time_s']:>9.2f}"
              f"{m['stock_pipelined']['step_time_s']:>9.2f}"
              f"{m['tencache']['step_time_s']:>11.2f}{m['lower_bound_s']:>9.2f}{m['speedup']:>8.2f}"
              f"{m['speedup_vs_pipelined']:>10.2f}{m['tencache']['step_time_s'] / m['lower_bound_s']:>9.2f}"
              f"{m['stock']['hit_rate']:>10.2f}{m['tencache']['hit_rate']:>8.2f}"
              f"{(paper[0] / paper[1]) if paper else float('nan'):>8.2f}"
              + "".join(f"{other[k]['models'][name]['speedup']:>12.2f}" for k in other))
    c = calibration
    print(f"calibration, {c['model']}: measured stock {c['measured_step_s']['stock'] * 1e3:.1f} ms, "
          f"tencache {c['measured_step_s']['tencache'] * 1e3:.1f} ms; simulated stock "
          f"{c['simulated_step_s']['stock'] * 1e3:.1f} ms, tencache "
          f"{c['simulated_step_s']['tencache'] * 1e3:.1f} ms; relative error {c['relative_error']:.3f} "
          f"(ZeRO-3's measured host cost: {c['host']['group_overhead_s'] * 1e3:.2f} ms per fetch group, "
          f"{c['host']['fetch_overhead_s'] * 1e3:.2f} ms per fetch)")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')} in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
