"""The main job on an embedded default: a short run of both halves on the tiny local model.

`make demo` runs this after installing. It prints the versions, the accelerator DeepSpeed picked,
the losses of a short ZeRO-3 training run, and a short vLLM offline generation. As the packages
grow, their demos join here.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from tiny_llama import SIZES

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DS_CONFIG = ROOT / "configs" / "zero3_cpu_offload.json"
PROMPTS = ["The scheduler reads", "Every request moves", "def step(x):", "The cache evicts"]


def section(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def show_versions() -> None:
    import deepspeed
    import torch
    import transformers
    import vllm
    from deepspeed.accelerator import get_accelerator

    import ds_tencache
    import vllm_fairserve

    section("versions")
    rows = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "vllm": vllm.__version__,
        "transformers": transformers.__version__,
        "ds_tencache": ds_tencache.__version__,
        "vllm_fairserve": vllm_fairserve.__version__,
        "DeepSpeed accelerator": f"{get_accelerator().device_name()} "
                                 f"(backend {get_accelerator().communication_backend_name()})",
    }
    for name, value in rows.items():
        print(f"  {name:<22} {value}")


def demo_training(model_dir: Path, steps: int) -> None:
    import ds_tencache
    from ds_tencache.training_run import train

    section(f"DeepSpeed ZeRO-3, CPU parameter + optimizer offload, {steps} steps: stock vs tencache")
    config = json.loads(DEFAULT_DS_CONFIG.read_text())
    manifest = json.loads((model_dir / "manifest.json").read_text())
    budget = manifest["num_parameters"] * 4 // 2  # half the fp32 parameters fit on the device
    print(f"  config: {DEFAULT_DS_CONFIG.relative_to(ROOT)}; tencache adds "
          f"{{\"device_budget\": {budget}}} (half the parameter bytes)", flush=True)
    stock = train(model_dir, config, steps=steps)
    ours = train(model_dir, {**config, "tencache": {"device_budget": budget}}, steps=steps,
                 initialize=ds_tencache.initialize)
    for step in sorted({0, steps // 2, steps - 1}):
        print(f"  step {step:>3}  loss stock {stock.losses[step]:.4f}  tencache {ours.losses[step]:.4f}")
    planned = [m for m in ours.tencache_steps if m.phase == "planned"]
    print(f"  accelerator {stock.accelerator}, backend {stock.backend}, world size {stock.world_size}")
    print(f"  losses identical for all {steps} steps: {ours.losses == stock.losses}")
    if planned:
        print(f"  tencache after warm-up: hit rate {min(m.hit_rate for m in planned):.3f} (lowest step), "
              f"{planned[-1].all_gathers} all-gathers and "
              f"{sum(planned[-1].bytes_moved.values()) / 2**20:.1f} MiB moved per step")
    for label, result in (("stock", stock), ("tencache", ours)):
        warm = result.step_times_s[2:] or result.step_times_s
        print(f"  {label:<9} mean step after warm-up {sum(warm) / len(warm) * 1000:.0f} ms")


def demo_serving(model_dir: Path, max_tokens: int) -> None:
    from vllm import LLM, SamplingParams

    section(f"vLLM offline generation, {len(PROMPTS)} prompts x {max_tokens} tokens")
    start = time.perf_counter()
    llm = LLM(model=str(model_dir), dtype="float32", max_model_len=512, max_num_seqs=len(PROMPTS), seed=0)
    loaded = time.perf_counter() - start
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    tokens = sum(len(out.outputs[0].token_ids) for out in outputs)
    llm.llm_engine.engine_core.shutdown()
    for out in outputs[:2]:
        print(f"  {out.prompt!r} -> {out.outputs[0].text[:60]!r}")
    print(f"  engine start {loaded:.1f}s; {tokens} tokens in {elapsed:.2f}s "
          f"({tokens / elapsed:.0f} tok/s; random weights, so the text is noise)")


def quiet_upstream() -> None:
    """Keep the demo's own lines readable: upstream deprecation notices and INFO logs are noise here."""
    import logging
    import os
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    logging.getLogger("ds_tencache").setLevel(logging.WARNING)  # the demo prints its own summary


def demo_fair_scheduling() -> None:
    """The FairServe policy core in the simulator: one flooding tenant beside well-behaved ones."""
    from vllm_fairserve.sim import simulate
    from vllm_fairserve.sim_metrics import compute_metrics
    from vllm_fairserve.workload import Abuse, UserSpec, generate_workload

    section("vllm_fairserve policy core in the simulator: a 10x flooder beside 12 honest tenants")
    users = [UserSpec(f"{app}-{i}", app) for app, count in
             (("chat", 5), ("code", 4), ("summarise", 1), ("agent", 2)) for i in range(count)]
    users.append(UserSpec("flooder", "chat", abuse=Abuse.FLOOD))
    workload = generate_workload(users, duration_s=300.0, seed=0)
    print(f"  {'policy':<10}{'honest p50 TTFT':>16}{'honest p99 TTFT':>16}{'tok/s':>8}{'lost':>6}")
    for policy in ("fcfs", "vtc", "fairserve"):
        metrics = compute_metrics(simulate(workload, policy))
        print(f"  {policy:<10}{metrics.ttft_p50_s['well_behaved']:>14.2f} s"
              f"{metrics.ttft_p99_s['well_behaved']:>14.2f} s{metrics.throughput_tok_s:>8.0f}"
              f"{metrics.lost:>6}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny", choices=sorted(SIZES), help="tiny-model size")
    parser.add_argument("--steps", type=int, default=20, help="training steps")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens generated per prompt")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.max_tokens < 1:
        parser.error("--steps and --max-tokens must be at least 1")

    from tiny_llama.environment import apply_runtime_defaults

    apply_runtime_defaults()
    quiet_upstream()
    from tiny_llama import ensure_model

    show_versions()
    section(f"tiny model '{args.size}'")
    model_dir = ensure_model(args.size)
    manifest = json.loads((model_dir / "manifest.json").read_text())
    print(f"  {manifest['num_parameters']:,} parameters at {model_dir}")
    demo_training(model_dir, args.steps)
    demo_serving(model_dir, args.max_tokens)
    demo_fair_scheduling()
    section("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
