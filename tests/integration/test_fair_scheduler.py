"""FairScheduler against the real vLLM 0.32 scheduler classes, without a model, and end to end.

Most tests drive the real ``Scheduler`` / ``AsyncScheduler`` machinery the way vLLM's engine
core does: ``add_request``, ``schedule()``, a synthetic ``ModelRunnerOutput`` for what was
scheduled (one sampled token per request that finished its prefill), ``update_from_output()``.
The configs are built offline against the tiny local model; the KV cache is a bare
``KVCacheConfig`` with as many blocks as a test needs. Nothing of vLLM is mocked. The last test
starts a real ``LLM`` with ``scheduler_cls="vllm_fairserve.FairScheduler"``.
"""

from __future__ import annotations

import inspect
import json
import logging
import random
import re
from collections import deque
from dataclasses import dataclass, field

import pytest

pytestmark = pytest.mark.integration

BLOCK_SIZE = 16
SAMPLED_TOKEN = 7  # what the synthetic model "generates"; never an EOS (ignore_eos anyway)
PROMPT_TOKEN = 5

# A throttle that is always on (KV usage >= 0 counts as overload) and allows one "chat"
# interaction of 10 input + 10 output tokens per minute: 10 + 2 * 10 = 30 weighted tokens per
# 60 s window. A 16-token prompt fits once; the second one in the same window is held.
TIGHT_THROTTLE = {
    "applications": [{"id": "chat", "expected_input_tokens": 10, "expected_system_tokens": 0,
                      "expected_output_tokens": 10, "interactions_per_minute": 1}],
    "throttle": {"kv_usage_threshold": 0.0, "usage_allowance": 1.0, "poisson_slack_sigmas": 0.0,
                 "window_s": 60, "max_hold_s": 5},
}


# ------------------------------------------------------------------------------- building


def vllm_configs(model_dir, *, fairserve=None, num_blocks=256, max_num_seqs=8, max_num_batched_tokens=256,
                 enable_prefix_caching=False, async_scheduling=False, policy="fcfs", additional_config=None):
    import torch
    from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

    model_config = ModelConfig(model=str(model_dir), dtype="float32", seed=0, max_model_len=256)
    scheduler_config = SchedulerConfig(
        max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, max_model_len=256,
        enable_chunked_prefill=True, is_encoder_decoder=False, policy=policy,
    )
    cache_config = CacheConfig(block_size=BLOCK_SIZE, enable_prefix_caching=enable_prefix_caching)
    if additional_config is None:
        additional_config = {} if fairserve is None else {"fairserve": fairserve}
    vllm_config = VllmConfig(model_config=model_config, scheduler_config=scheduler_config,
                             cache_config=cache_config, additional_config=additional_config)
    # The CPU platform turns async scheduling off while the config is built; the GPU default is on.
    vllm_config.scheduler_config.async_scheduling = async_scheduling
    spec = FullAttentionSpec(block_size=BLOCK_SIZE, num_kv_heads=1, head_size=1, dtype=torch.float32)
    kv_cache_config = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[],
                                    kv_cache_groups=[KVCacheGroupSpec(["layer"], spec)])
    cache_config.num_gpu_blocks = num_blocks
    return vllm_config, kv_cache_config


def build(model_dir, cls=None, **options):
    """A scheduler as vLLM's engine core builds it (keyword arguments, same values)."""
    from vllm.v1.structured_output import StructuredOutputManager

    from vllm_fairserve import FairScheduler

    vllm_config, kv_cache_config = vllm_configs(model_dir, **options)
    cls = cls or FairScheduler
    return cls(vllm_config=vllm_config, kv_cache_config=kv_cache_config,
               structured_output_manager=StructuredOutputManager(vllm_config),
               include_finished_set=False, log_stats=True, block_size=BLOCK_SIZE, hash_block_size=BLOCK_SIZE)


def make_request(request_id, tenant=None, prompt_tokens=16, max_tokens=4, application=None, interaction=None,
                 call_index=None, prompt=None, arrival_time=None, block_hasher=None):
    from vllm import SamplingParams
    from vllm.v1.request import Request

    extra_args = {key: value for key, value in (("tenant", tenant), ("application", application),
                                                 ("interaction", interaction), ("call_index", call_index))
                  if value is not None}
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, extra_args=extra_args or None)
    token_ids = list(prompt) if prompt is not None else [PROMPT_TOKEN] * prompt_tokens
    return Request(request_id=request_id, prompt_token_ids=token_ids, sampling_params=params,
                   pooling_params=None, arrival_time=arrival_time, block_hasher=block_hasher)


def prefix_block_hasher(scheduler):
    """What vLLM's engine core attaches to each request when prefix caching is on."""
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash

    hash_fn = get_hash_fn_by_name(scheduler.cache_config.prefix_caching_hash_algo)
    init_none_hash(hash_fn)
    return get_request_block_hasher(BLOCK_SIZE, hash_fn)


class Clock:
    """The throttle's monotonic clock, moved by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Driver:
    """Steps a scheduler as vLLM's engine core does, with a synthetic model.

    Synchronous mode follows ``EngineCore.step`` (schedule, execute, update). Async mode follows
    ``EngineCore.step_with_batch_queue`` with two batches in flight: the next step is scheduled
    before the previous step's output is processed.
    """

    scheduler: object
    pipelined: bool = False
    finished: dict[str, tuple[object, object]] = field(default_factory=dict)  # id -> (finish reason, stop reason)
    first_scheduled: list[str] = field(default_factory=list)  # request ids in order of first scheduling
    preempted: list[str] = field(default_factory=list)
    scheduled: list[dict[str, int]] = field(default_factory=list)  # tokens per request, per step
    preempted_per_step: list[set[str]] = field(default_factory=list)  # preempted_req_ids, per step
    steps: int = 0
    _in_flight: deque = field(default_factory=deque)

    def add(self, *requests) -> None:
        for request in requests:
            self.scheduler.add_request(request)

    def step(self) -> None:
        scheduler = self.scheduler
        self.steps += 1
        if scheduler.has_requests():
            output = scheduler.schedule()
            self.preempted.extend(sorted(output.preempted_req_ids))
            self.preempted_per_step.append(set(output.preempted_req_ids))
            self.scheduled.append(dict(output.num_scheduled_tokens))
            for request_id in output.num_scheduled_tokens:
                if request_id not in self.first_scheduled:
                    self.first_scheduled.append(request_id)
            self._in_flight.appendleft((output, self._model_output(output)))
            if self.pipelined and len(self._in_flight) < 2 and output.total_num_scheduled_tokens > 0:
                return
        if self._in_flight:
            output, model_output = self._in_flight.pop()
            self._collect(scheduler.update_from_output(output, model_output))

    def _model_output(self, output):
        from vllm.v1.outputs import ModelRunnerOutput

        ids = list(output.num_scheduled_tokens)
        requests = self.scheduler.requests
        # A request samples a token when this step completes its prefill (decided at schedule time).
        sampled = [[] if requests[request_id].is_prefill_chunk else [SAMPLED_TOKEN] for request_id in ids]
        return ModelRunnerOutput(req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                                 sampled_token_ids=sampled)

    def _collect(self, engine_core_outputs) -> None:
        for outputs in engine_core_outputs.values():
            for output in outputs.outputs:
                if output.finish_reason is not None:
                    assert output.request_id not in self.finished, f"{output.request_id} finished twice"
                    self.finished[output.request_id] = (output.finish_reason, output.stop_reason)

    def busy(self) -> bool:
        return self.scheduler.has_requests() or bool(self._in_flight)

    def run(self, max_steps: int = 10_000, until=None) -> None:
        for _ in range(max_steps):
            if not self.busy() or (until is not None and until()):
                return
            self.step()
        raise AssertionError(f"not done after {max_steps} steps")


MODES = pytest.mark.parametrize("mode", ["sync", "async"])


def build_mode(model_dir, mode, **options):
    """FairScheduler in vLLM's sync mode, or (constructed through the same name) in async mode."""
    scheduler = build(model_dir, async_scheduling=(mode == "async"), **options)
    return scheduler, Driver(scheduler, pipelined=(mode == "async"))


# ------------------------------------------------------------------ wiring into vLLM, pinned

# Upstream parameters (name=default) this adapter was written against (vLLM 0.32.0). If one
# changes, re-read the upstream method and vllm_fairserve/scheduler.py's docstring before
# updating the pin.
PINNED_SIGNATURES = {
    "__init__": "(self, vllm_config, kv_cache_config, structured_output_manager, block_size, hash_block_size=None, "
                "mm_registry=MULTIMODAL_REGISTRY, include_finished_set=False, log_stats=False)",
    "schedule": "(self, throttle_prefills=False)",
    "update_from_output": "(self, scheduler_output, model_runner_output)",
    "add_request": "(self, request)",
    "get_request_counts": "(self)",
    "_enqueue_waiting_request": "(self, request)",
    "_free_request": "(self, request, delay_free_blocks=False)",
    "finish_requests": "(self, request_ids, finished_status)",
}


def _signature(function) -> str:
    """Parameter names and defaults, the part callers depend on."""
    from vllm.multimodal import MULTIMODAL_REGISTRY

    def show(parameter):
        if parameter.default is inspect.Parameter.empty:
            return parameter.name
        default = "MULTIMODAL_REGISTRY" if parameter.default is MULTIMODAL_REGISTRY else repr(parameter.default)
        return f"{parameter.name}={default}"

    return "(" + ", ".join(show(p) for p in inspect.signature(function).parameters.values()) + ")"


def test_upstream_scheduler_is_the_one_this_adapter_was_written_against():
    import vllm
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.core.sched.scheduler import Scheduler

    from vllm_fairserve import scheduler as adapter

    assert vllm.__version__ == adapter.VLLM_VERSION, "vLLM changed: re-check the pins below, then VLLM_VERSION"
    assert set(PINNED_SIGNATURES) == set(adapter.OVERRIDDEN_UPSTREAM_METHODS)
    for name, expected in PINNED_SIGNATURES.items():
        assert _signature(getattr(Scheduler, name)) == expected, f"Scheduler.{name} changed upstream"
        assert name in vars(adapter.FairScheduler), f"FairScheduler no longer overrides {name}"
    # The behaviour the overrides rely on, which no signature shows.
    schedule = inspect.getsource(Scheduler.schedule)
    assert "preempted_req = self.running[-1]" in schedule and "preempted_req = self.running.pop()" in schedule, (
        "vLLM no longer picks the FCFS preemption victim as running[-1]: FairScheduler's victim order breaks"
    )
    assert "self.waiting.prepend_request(request)" in inspect.getsource(Scheduler._preempt_request)
    assert "self.reset_preempted_req_ids.add(request.request_id)" in inspect.getsource(Scheduler._preempt_request)
    # The fair queue's admission gate (the headroom rule) answers the one truth test vLLM makes
    # of the waiting queue, right before it peeks at the head to admit it.
    assert schedule.count("if not request_queue or input_budget <= draft_slots:") == 1
    assert schedule.count("request = request_queue.peek_request()") == 1
    assert re.search(r"(if|not|and|or|while) self\.waiting\b(?!\.)", schedule) is None
    # The eviction pre-pass sizes admissions as vLLM's own gate does (the whole sequence).
    assert "full_sequence_must_fit=self.scheduler_reserve_full_isl" in schedule
    assert "self.prev_step_scheduled_req_ids.clear()" in inspect.getsource(Scheduler.reset_prefix_cache)
    assert "self._enqueue_waiting_request(request)" in inspect.getsource(Scheduler.add_request)
    assert "self._free_request(request" in inspect.getsource(Scheduler.update_from_output)
    assert "self._free_request(request" in inspect.getsource(Scheduler.finish_requests)
    # AsyncScheduler must stay disjoint from what FairScheduler overrides (besides __init__).
    async_overrides = {name for name, value in vars(AsyncScheduler).items() if inspect.isfunction(value)}
    assert async_overrides == {"__init__", "_update_after_schedule", "_update_request_with_output"}


def test_scheduler_cls_dotted_path_resolves_lazily():
    from vllm.config import SchedulerConfig

    import vllm_fairserve
    from vllm_fairserve.scheduler import AsyncFairScheduler, FairScheduler

    config = SchedulerConfig(max_model_len=256, is_encoder_decoder=False,
                             scheduler_cls="vllm_fairserve.FairScheduler")
    assert config.get_scheduler_cls() is FairScheduler
    assert vllm_fairserve.AsyncFairScheduler is AsyncFairScheduler
    with pytest.raises(AttributeError):
        vllm_fairserve.NoSuchScheduler  # noqa: B018


def test_one_name_builds_the_sync_or_async_scheduler(tiny_model_dir):
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler

    from vllm_fairserve.scheduler import AsyncFairScheduler, FairScheduler

    sync = build(tiny_model_dir, async_scheduling=False)
    assert type(sync) is FairScheduler and not isinstance(sync, AsyncScheduler)
    asynchronous = build(tiny_model_dir, async_scheduling=True)
    assert type(asynchronous) is AsyncFairScheduler and isinstance(asynchronous, AsyncScheduler)
    explicit = build(tiny_model_dir, cls=AsyncFairScheduler, async_scheduling=False)
    assert type(explicit) is AsyncFairScheduler


@pytest.mark.parametrize("form", ["inline", "json string", "yaml file"])
def test_config_arrives_through_additional_config(tiny_model_dir, tmp_path, form):
    block = {"tenants": [{"id": "gold", "weight": 3}]}
    if form == "inline":
        source = block
    elif form == "json string":
        source = json.dumps(block)
    else:
        path = tmp_path / "fairserve.yaml"
        path.write_text("tenants:\n  - id: gold\n    weight: 3\n")
        source = str(path)
    scheduler = build(tiny_model_dir, fairserve=source)
    assert scheduler.fairserve_config.tenant_weight("gold") == 3
    assert type(scheduler.waiting).__name__ == "FairRequestQueue"


def test_invalid_config_stops_construction_naming_the_key(tiny_model_dir):
    from vllm_fairserve.config import FairServeConfigError

    with pytest.raises(FairServeConfigError, match=r"fairserve\.tenants\[0\]\.weight = -1"):
        build(tiny_model_dir, fairserve={"tenants": [{"id": "a", "weight": -1}]})
    with pytest.raises(FairServeConfigError, match=r"fairserve\.throttle\.max_hold: unknown key 'max_hold'"):
        build(tiny_model_dir, fairserve=json.dumps({"throttle": {"max_hold": 3}}))
    with pytest.raises(FairServeConfigError, match="does not exist"):
        build(tiny_model_dir, fairserve="/nonexistent/fairserve.yaml")
    with pytest.raises(ValueError, match="scheduling_policy = 'priority'"):
        build(tiny_model_dir, policy="priority")
    # Other plugins' keys in additional_config are not ours to judge.
    assert build(tiny_model_dir, additional_config={"other_plugin": {"x": 1}}).fairserve_config.tenants == []


# ------------------------------------------------------------------------- the fair queue


def _flood_then_late_tenant(driver, *, late_after_steps=1):
    driver.add(*[make_request(f"flood-{i}", tenant="flooder", prompt_tokens=32, max_tokens=4) for i in range(8)])
    for _ in range(late_after_steps):
        driver.step()
    driver.add(*[make_request(f"late-{i}", tenant="late", prompt_tokens=32, max_tokens=4) for i in range(2)])
    driver.run()


@MODES
def test_a_late_tenant_goes_before_a_flooders_backlog(tiny_model_dir, mode):
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.core.sched.scheduler import Scheduler

    stock_cls = AsyncScheduler if mode == "async" else Scheduler
    stock = Driver(build(tiny_model_dir, cls=stock_cls, max_num_seqs=2, async_scheduling=(mode == "async")),
                   pipelined=(mode == "async"))
    _flood_then_late_tenant(stock)
    # FCFS: the late tenant waits behind the whole flood.
    assert stock.first_scheduled[-2:] == ["late-0", "late-1"]

    fair, driver = build_mode(tiny_model_dir, mode, max_num_seqs=2)
    _flood_then_late_tenant(driver)
    order = driver.first_scheduled
    # Fair: the late tenant takes the next free slots, ahead of the flooder's backlog.
    assert order.index("late-1") < order.index("flood-4"), order
    assert len(driver.finished) == 10 and not fair.requests


@MODES
def test_counters_charge_exactly_the_tokens_computed(tiny_model_dir, mode):
    fairserve = {
        "tenants": [{"id": "gold", "weight": 2}],
        "applications": [
            # Twice the default application's per-minute cost (256 in + 2 * 256 out, 6/min):
            # charges are halved.
            {"id": "summarise", "expected_input_tokens": 512, "expected_system_tokens": 0,
             "expected_output_tokens": 512, "interactions_per_minute": 6},
        ],
        "throttle": {"enabled": False},
    }
    # 100-token prompts with a 64-token budget: prefills are chunked across steps.
    scheduler, driver = build_mode(tiny_model_dir, mode, fairserve=fairserve, max_num_batched_tokens=64)
    driver.add(make_request("g0", tenant="gold", prompt_tokens=100, max_tokens=5),
               make_request("g1", tenant="gold", prompt_tokens=30, max_tokens=3),
               make_request("s0", tenant="plain", application="summarise", prompt_tokens=100, max_tokens=6),
               make_request("d0", prompt_tokens=20, max_tokens=2),  # untagged: the default tenant
               make_request("m0", tenant=12345, prompt_tokens=10, max_tokens=1))  # malformed: the default too
    driver.run()
    assert sorted(driver.finished) == ["d0", "g0", "g1", "m0", "s0"]
    counters = scheduler.counters
    service = counters.service("gold")
    assert (service.input_tokens, service.output_tokens) == (130, 8)
    assert counters.counter("gold") == pytest.approx((130 + 2 * 8) / 2)  # weight 2
    service = counters.service("plain")
    assert (service.input_tokens, service.output_tokens) == (100, 6)
    assert counters.counter("plain") == pytest.approx((100 + 2 * 6) / 2)  # normalised by the application
    assert counters.counter("default") == pytest.approx(20 + 2 * 2 + 10 + 2 * 1)  # exactly VTC's charge
    assert not counters.active_tenants()  # nothing waiting or running any more


def test_prefix_cache_hits_are_not_charged(tiny_model_dir):
    scheduler, driver = build_mode(tiny_model_dir, "sync", enable_prefix_caching=True)
    hasher = prefix_block_hasher(scheduler)
    prompt = list(range(1, 65))  # four full blocks
    driver.add(make_request("first", tenant="t", prompt=prompt, max_tokens=2, block_hasher=hasher))
    driver.run()
    driver.add(make_request("second", tenant="t", prompt=prompt, max_tokens=2, block_hasher=hasher))
    driver.run()
    computed = next(step["second"] for step in driver.scheduled if "second" in step)
    assert computed < 64  # vLLM served the rest from the prefix cache
    assert scheduler.counters.service("t").input_tokens == 64 + computed


def test_counter_lift_and_deactivation(tiny_model_dir):
    scheduler, driver = build_mode(tiny_model_dir, "sync")
    counters = scheduler.counters
    driver.add(make_request("a0", tenant="a", prompt_tokens=48, max_tokens=8))
    driver.step()
    driver.step()
    served_a = counters.counter("a")
    assert served_a > 0 and counters.is_active("a")
    # b becomes active while a is: lifted to a's counter, so it banks no credit for having been idle.
    driver.add(make_request("b0", tenant="b", prompt_tokens=16, max_tokens=8))
    assert counters.counter("b") == pytest.approx(served_a)
    driver.run()
    assert not counters.is_active("a") and not counters.is_active("b")
    # a comes back after b was served more: lifted only while someone is active (b is not), so
    # it keeps its own counter; then b returns and is lifted to a's.
    a_before, b_before = counters.counter("a"), counters.counter("b")
    driver.add(make_request("a1", tenant="a", prompt_tokens=16, max_tokens=2))
    assert counters.counter("a") == pytest.approx(a_before)
    driver.add(make_request("b1", tenant="b", prompt_tokens=16, max_tokens=2))
    assert counters.counter("b") == pytest.approx(max(b_before, a_before))
    driver.run()


# ---------------------------------------------------------------------------- preemption


def _fill_kv_then_grow(driver):
    # 8 usable blocks of 16 tokens: tenant b's 8-token prompts take 1 each (b never needs a
    # second), tenant a's 44-token prompts 3 each. a's fifth decode needs a fourth block, which
    # only a preemption can free. b is admitted first, so vLLM's own victim (the last admitted)
    # is one of a's requests, which have computed 49 tokens by then; b's have computed 13 and
    # a's long prompts give a the higher counter (under async scheduling too, where a decision
    # sees the counters of the step before the one in flight).
    driver.add(make_request("b1", tenant="b", prompt_tokens=8, max_tokens=8),
               make_request("b2", tenant="b", prompt_tokens=8, max_tokens=8),
               make_request("a1", tenant="a", prompt_tokens=44, max_tokens=8),
               make_request("a2", tenant="a", prompt_tokens=44, max_tokens=8))
    driver.run()


@MODES
def test_preemption_victim_is_the_request_cheapest_to_recompute(tiny_model_dir, mode):
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.core.sched.scheduler import Scheduler

    options = {"num_blocks": 9, "max_num_seqs": 4}  # one of the 9 is vLLM's null block
    stock_cls = AsyncScheduler if mode == "async" else Scheduler
    stock = Driver(build(tiny_model_dir, cls=stock_cls, async_scheduling=(mode == "async"), **options),
                   pipelined=(mode == "async"))
    _fill_kv_then_grow(stock)
    assert stock.preempted and set(stock.preempted) <= {"a1", "a2"}  # FCFS: the newest, 49 tokens computed

    scheduler, driver = build_mode(tiny_model_dir, mode, **options)
    _fill_kv_then_grow(driver)
    # FairScheduler: the least computed, though tenant a's counter is the higher one.
    assert driver.preempted and set(driver.preempted) <= {"b1", "b2"}, driver.preempted
    assert scheduler.counters.counter("a") > scheduler.counters.counter("b")
    assert len(driver.finished) == 4
    # The preempted request recomputed its prompt (and output so far) after resuming; it is
    # charged once: every prompt token once, every output token once.
    service = scheduler.counters.service("b")
    assert (service.input_tokens, service.output_tokens) == (16, 16)


# ------------------------------------------- joining the batch: headroom and eviction rules

# One small application ("chat": 10 + 2 x 10 = 30 weighted tokens a minute, no slack), so a
# 40-token prompt puts its pair over the allowance; the default application is declared small
# too, so the headroom (the longest expected prompt) is 16 tokens. Arrivals are never held
# (waiting-queue and KV thresholds not reached at submit): what holds requests back here is the
# rule where a waiting request joins the running batch.
JOIN_RULES = {
    "applications": [
        {"id": "chat", "expected_input_tokens": 10, "expected_system_tokens": 0, "expected_output_tokens": 10,
         "interactions_per_minute": 1},
        {"id": "default", "expected_input_tokens": 16, "expected_system_tokens": 0, "expected_output_tokens": 16,
         "interactions_per_minute": 6},
    ],
    "throttle": {"kv_usage_threshold": 0.6, "usage_allowance": 1.0, "poisson_slack_sigmas": 0.0, "window_s": 60},
}


def _first_step_of(driver, request_id):
    return next(i for i, step in enumerate(driver.scheduled) if request_id in step)


@MODES
@pytest.mark.parametrize("rules", ["on", "off"])
def test_over_allowance_request_waits_for_headroom_in_allowance_one_does_not(tiny_model_dir, mode, rules):
    # 16 usable blocks (256 tokens); the line is 0.6 of them. Four flood prompts of 40 tokens
    # (3 blocks each) would fill 12 blocks = 0.75: the fourth one would cross the line.
    fairserve = JOIN_RULES if rules == "on" else {**JOIN_RULES, "throttle": {"enabled": False}}
    scheduler, driver = build_mode(tiny_model_dir, mode, fairserve=fairserve, num_blocks=17,
                                   max_num_seqs=8, max_num_batched_tokens=256)
    scheduler.clock = Clock()
    flood = [make_request(f"f{i}", tenant="flood", application="chat", prompt_tokens=40, max_tokens=6)
             for i in range(4)]
    driver.add(*flood)
    assert not scheduler.held_request_ids()  # nothing held at arrival: the engine was idle
    driver.step()
    first = driver.scheduled[0]
    if rules == "off":
        assert set(first) == {"f0", "f1", "f2", "f3"}  # vLLM admits whatever fits
        driver.run()
        return
    assert set(first) == {"f0", "f1", "f2"}, first  # f3 would leave 0.75 of the cache used
    assert scheduler.kv_cache_manager.block_pool.get_num_free_blocks() >= 3  # it would have fit
    # An in-allowance request is not held back by the line, though it crosses it.
    driver.add(make_request("calm", tenant="calm", prompt_tokens=40, max_tokens=2))
    driver.run(until=lambda: "calm" in driver.first_scheduled)
    assert "f3" not in driver.first_scheduled[:driver.first_scheduled.index("calm")]
    driver.run()  # held back, never lost: the flood runs once there is room
    assert {request_id: reason.name for request_id, (reason, _) in driver.finished.items()} == {
        "f0": "LENGTH", "f1": "LENGTH", "f2": "LENGTH", "f3": "LENGTH", "calm": "LENGTH"}
    assert not driver.preempted


@MODES
def test_a_head_refused_headroom_does_not_stop_admission_behind_it(tiny_model_dir, mode):
    # As above: f3 is refused for the headroom line. "calm" (in its allowance) arrives behind it
    # in fair order (lifted to the flood's counter, later arrival) and must join in the very
    # next step: the headroom f3 is refused is kept for requests like calm's.
    scheduler, driver = build_mode(tiny_model_dir, mode, fairserve=JOIN_RULES, num_blocks=17,
                                   max_num_seqs=8, max_num_batched_tokens=256)
    scheduler.clock = Clock()
    driver.add(*(make_request(f"f{i}", tenant="flood", application="chat", prompt_tokens=40, max_tokens=6)
                 for i in range(4)))
    driver.step()
    assert set(driver.scheduled[0]) == {"f0", "f1", "f2"}
    driver.add(make_request("calm", tenant="calm", prompt_tokens=16, max_tokens=2))
    assert scheduler.waiting.peek_request().request_id == "f3"  # first in fair order
    driver.step()
    assert "calm" in driver.scheduled[1] and "f3" not in driver.scheduled[1], driver.scheduled
    driver.run()
    assert set(driver.finished) == {"f0", "f1", "f2", "f3", "calm"}


@MODES
@pytest.mark.parametrize("rules", ["on", "off"])
def test_in_allowance_request_evicts_over_allowance_ones_of_a_higher_counter(tiny_model_dir, mode, rules):
    # The line is at 1.0 here, so the flood fills 12 of the 16 blocks; "calm" needs 5 for its
    # 80-token prompt (vLLM admits only if the whole prompt fits), one more than are free.
    throttle = {**JOIN_RULES["throttle"], "kv_usage_threshold": 1.0}
    if rules == "off":
        throttle["enabled"] = False
    scheduler, driver = build_mode(tiny_model_dir, mode, fairserve={**JOIN_RULES, "throttle": throttle},
                                   num_blocks=17, max_num_seqs=8, max_num_batched_tokens=256)
    scheduler.clock = Clock()
    driver.add(*(make_request(f"f{i}", tenant="flood", application="chat", prompt_tokens=40, max_tokens=8)
                 for i in range(4)))
    driver.run(until=lambda: len(driver.first_scheduled) == 4)
    driver.step()  # the flood is decoding
    driver.add(make_request("calm", tenant="calm", prompt_tokens=80, max_tokens=4))
    driver.run(until=lambda: "calm" in driver.first_scheduled)
    admitted_at = _first_step_of(driver, "calm")
    if rules == "off":
        assert not driver.preempted  # vLLM never preempts to admit: calm waited for the flood to end
        assert all(step.get(f"f{i}") is None for step in driver.scheduled[admitted_at:] for i in range(4))
    else:
        # The flood's least-computed, last-admitted request made room, in the step calm joined.
        assert driver.preempted_per_step[admitted_at] == {"f3"}, driver.preempted_per_step
        victim = scheduler.requests["f3"]
        assert victim in scheduler.waiting and victim not in scheduler.running
    driver.run()
    assert {request_id: reason.name for request_id, (reason, _) in driver.finished.items()} == {
        "f0": "LENGTH", "f1": "LENGTH", "f2": "LENGTH", "f3": "LENGTH", "calm": "LENGTH"}
    # The victim was recomputed, not charged twice, and generated each of its tokens once.
    service = scheduler.counters.service("flood")
    assert (service.input_tokens, service.output_tokens) == (160, 32)


@MODES
def test_over_allowance_requests_are_the_first_preemption_victims(tiny_model_dir, mode):
    # a1's 44-token chat prompt puts tenant a over its allowance at once; b's requests are in
    # theirs. vLLM's victim is running[-1]: after a step that admits nobody, the running list is
    # in preemption order, and a1 is last though it has computed the most.
    throttle = {**JOIN_RULES["throttle"], "kv_usage_threshold": 1.0}
    scheduler, driver = build_mode(tiny_model_dir, mode, fairserve={**JOIN_RULES, "throttle": throttle},
                                   num_blocks=17, max_num_seqs=8, max_num_batched_tokens=256)
    scheduler.clock = Clock()
    driver.add(make_request("b1", tenant="b", prompt_tokens=8, max_tokens=8),
               make_request("a1", tenant="a", application="chat", prompt_tokens=44, max_tokens=8),
               make_request("b2", tenant="b", prompt_tokens=8, max_tokens=8))
    driver.step()
    driver.step()
    assert len(scheduler.running) == 3
    assert scheduler.running[-1].request_id == "a1", [r.request_id for r in scheduler.running]
    driver.run()
    assert len(driver.finished) == 3


def test_eviction_never_takes_in_allowance_or_lower_counter_requests(tiny_model_dir):
    # Same shape, but the running requests are in their allowance (default application): the
    # waiting request waits for memory as under vLLM's own scheduler.
    throttle = {**JOIN_RULES["throttle"], "kv_usage_threshold": 1.0}
    scheduler, driver = build_mode(tiny_model_dir, "sync", fairserve={**JOIN_RULES, "throttle": throttle},
                                   num_blocks=17, max_num_seqs=8, max_num_batched_tokens=256)
    scheduler.clock = Clock()
    driver.add(*(make_request(f"h{i}", tenant=f"honest{i}", prompt_tokens=40, max_tokens=8) for i in range(4)))
    driver.run(until=lambda: len(driver.first_scheduled) == 4)
    driver.step()
    driver.add(make_request("calm", tenant="calm", prompt_tokens=80, max_tokens=4))
    driver.run()
    assert not driver.preempted
    assert len(driver.finished) == 5


# ------------------------------------------------------------------------------ throttle


def _throttled(tiny_model_dir, mode="sync", **options):
    scheduler, driver = build_mode(tiny_model_dir, mode, fairserve=TIGHT_THROTTLE, **options)
    clock = scheduler.clock = Clock()
    return scheduler, driver, clock


@MODES
def test_throttle_holds_then_releases_without_losing_the_request(tiny_model_dir, mode):
    scheduler, driver, clock = _throttled(tiny_model_dir, mode)
    driver.add(make_request("first", tenant="busy", application="chat", prompt_tokens=16, max_tokens=2),
               make_request("second", tenant="busy", application="chat", prompt_tokens=16, max_tokens=2),
               make_request("other", tenant="calm", application="chat", prompt_tokens=16, max_tokens=2))
    assert scheduler.held_request_ids() == ["second"]
    assert scheduler.get_request_counts() == (0, 3)  # held requests count as waiting
    driver.run(until=lambda: "first" in driver.finished and "other" in driver.finished)
    assert "second" not in driver.first_scheduled and scheduler.held_request_ids() == ["second"]
    assert scheduler.has_requests()  # the engine keeps stepping for it
    clock.now += 61  # the window slides past the usage: the pair fits again
    driver.run()
    assert driver.finished["second"][0].name == "LENGTH"
    stats = scheduler.throttle.stats()["busy"]
    assert (stats.submitted, stats.held, stats.released, stats.holding) == (2, 1, 1, 0)


@MODES
def test_throttle_deadline_finishes_the_request_as_aborted_with_a_reason(tiny_model_dir, mode, caplog):
    scheduler, driver, clock = _throttled(tiny_model_dir, mode)
    driver.add(make_request("first", tenant="busy", application="chat", prompt_tokens=16, max_tokens=2),
               make_request("second", tenant="busy", application="chat", prompt_tokens=16, max_tokens=2))
    driver.run(until=lambda: "first" in driver.finished)
    clock.now += 6  # past max_hold_s = 5, still inside the 60 s window
    with caplog.at_level(logging.WARNING, logger="vllm_fairserve.scheduler"):
        driver.run()
    reason, stop_reason = driver.finished["second"]
    assert reason.name == "ABORT"
    assert stop_reason.startswith("throttled:") and "'busy'" in stop_reason and "'chat'" in stop_reason
    assert "second" not in scheduler.requests and not scheduler.held_request_ids()
    assert any("second" in r.getMessage() and "'busy'" in r.getMessage() and "throttled:" in r.getMessage()
               for r in caplog.records)
    assert scheduler.throttle.stats()["busy"].expired == 1
    assert not scheduler.has_requests()


def test_client_aborts_of_waiting_held_and_running_requests(tiny_model_dir):
    from vllm.v1.request import RequestStatus

    scheduler, driver, clock = _throttled(tiny_model_dir, max_num_seqs=1)
    driver.add(make_request("running", tenant="a", application="chat", prompt_tokens=16, max_tokens=50),
               make_request("held", tenant="a", application="chat", prompt_tokens=16, max_tokens=2),
               make_request("waiting", tenant="b", application="chat", prompt_tokens=16, max_tokens=2))
    driver.step()
    assert [r.request_id for r in scheduler.running] == ["running"]
    assert list(scheduler.waiting) == [scheduler.requests["waiting"]]
    assert scheduler.held_request_ids() == ["held"]

    aborted = scheduler.finish_requests(["held", "waiting"], RequestStatus.FINISHED_ABORTED)
    assert sorted(r.request_id for r in aborted) == ["held", "waiting"]
    assert not scheduler.held_request_ids() and len(scheduler.waiting) == 0
    assert scheduler.throttle.stats()["a"].cancelled == 1
    assert not scheduler.counters.is_active("b")  # nothing left waiting or running
    assert scheduler.counters.is_active("a")
    scheduler.finish_requests("running", RequestStatus.FINISHED_ABORTED)
    assert not scheduler.counters.is_active("a")
    clock.now += 100  # nothing held any more: nothing to release or expire
    driver.run()
    assert not scheduler.requests and set(driver.finished) == set()  # clients aborted, vLLM sends those
    # Aborting twice, or an unknown id, changes nothing.
    assert scheduler.finish_requests(["held", "nope"], RequestStatus.FINISHED_ABORTED) == []


# -------------------------------------------------------------------------------- scale


def test_a_thousand_tenants_and_a_flooder(tiny_model_dir):
    scheduler, driver = build_mode(tiny_model_dir, "sync", max_num_seqs=64, max_num_batched_tokens=1024,
                                   num_blocks=1024)
    driver.add(*[make_request(f"flood-{i}", tenant="flooder", prompt_tokens=8, max_tokens=2) for i in range(300)])
    tenants = [f"tenant-{i:04d}" for i in range(1000)]
    driver.add(*[make_request(f"{tenant}-r", tenant=tenant, prompt_tokens=8, max_tokens=2) for tenant in tenants])
    driver.run()
    assert len(driver.finished) == 1300 and not scheduler.requests
    order = driver.first_scheduled
    last_polite = max(order.index(f"{tenant}-r") for tenant in tenants)
    flood_before = sum(1 for request_id in order[:last_polite] if request_id.startswith("flood-"))
    # The flooder arrived first, so it fills the very first step (counters are all 0 then);
    # after that every other tenant goes first.
    assert flood_before <= 64
    for tenant in tenants[::97]:
        service = scheduler.counters.service(tenant)
        assert (service.input_tokens, service.output_tokens) == (8, 2)
    assert not scheduler.counters.active_tenants()


# ------------------------------------------------------------------------------ metrics


def test_metrics_report_service_queues_and_throttle_per_tenant(tiny_model_dir, tmp_path, caplog):
    from prometheus_client import CollectorRegistry

    from vllm_fairserve.metrics import MetricsPublisher, PrometheusExporter, read_snapshot

    path = tmp_path / "metrics" / "fairserve.json"
    fairserve_metrics = {"path": str(path), "publish_interval_s": 5, "log_interval_s": 30}
    scheduler, driver = build_mode(tiny_model_dir, "sync", max_num_seqs=1,
                                   additional_config={"fairserve": TIGHT_THROTTLE,
                                                      "fairserve_metrics": fairserve_metrics})
    clock = scheduler.clock = Clock()
    registry = CollectorRegistry()
    scheduler.metrics = MetricsPublisher(scheduler.metrics.config, PrometheusExporter(1000, registry))
    driver.add(make_request("a0", tenant="a", application="chat", prompt_tokens=16, max_tokens=3),
               make_request("a1", tenant="a", application="chat", prompt_tokens=16, max_tokens=3),  # held
               make_request("b0", tenant="b", application="chat", prompt_tokens=16, max_tokens=3))
    with caplog.at_level(logging.INFO, logger="vllm_fairserve.metrics"):
        driver.step()  # the first schedule() publishes: nothing was published before
    now = read_snapshot(path)
    assert now["tenants"]["a"]["running"] == 1 and now["tenants"]["a"]["held"] == 1
    assert now["tenants"]["b"]["waiting"] == 1 and (now["waiting"], now["running"], now["held"]) == (1, 1, 1)
    assert now["tenants"]["a"]["throttle_held"] == 1 and now["tenants"]["b"]["throttle_held"] == 0
    assert any("fairserve: 2 tenants (2 active), 1 waiting, 1 running, 1 held" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    driver.step()
    assert read_snapshot(path) == now  # not due yet: the interval is 5 s of the scheduler's clock

    clock.now += 61  # a1's window passes: released, and then everything runs to the end
    driver.run()
    final = read_snapshot(path)  # published when the engine ran out of requests
    counters = scheduler.counters
    for tenant in ("a", "b"):
        figures, service = final["tenants"][tenant], counters.service(tenant)
        assert (figures["input_tokens"], figures["output_tokens"]) == (service.input_tokens, service.output_tokens)
        assert figures["counter"] == pytest.approx(counters.counter(tenant))
        assert (figures["waiting"], figures["running"], figures["held"], figures["active"]) == (0, 0, 0, False)
        sample = registry.get_sample_value
        assert sample("fairserve:served_tokens_total", {"tenant": tenant, "kind": "output"}) == service.output_tokens
        assert sample("fairserve:served_tokens_total", {"tenant": tenant, "kind": "input"}) == service.input_tokens
        assert sample("fairserve:service_counter", {"tenant": tenant}) == pytest.approx(counters.counter(tenant))
        assert sample("fairserve:requests", {"tenant": tenant, "state": "waiting"}) == 0
    assert final["tenants"]["a"]["output_tokens"] == 6 and final["tenants"]["a"]["input_tokens"] == 32
    assert final["tenants"]["a"]["throttle_released"] == 1
    assert registry.get_sample_value("fairserve:throttled_requests_total",
                                     {"tenant": "a", "outcome": "released"}) == 1


def test_metrics_cap_tenant_labels_and_publish_client_aborts(tiny_model_dir):
    from prometheus_client import CollectorRegistry
    from vllm.v1.request import RequestStatus

    from vllm_fairserve.metrics import MetricsConfig, MetricsPublisher, PrometheusExporter

    scheduler, driver = build_mode(tiny_model_dir, "sync")
    registry = CollectorRegistry()
    scheduler.metrics = MetricsPublisher(MetricsConfig(log_interval_s=0), PrometheusExporter(2, registry))
    driver.add(*[make_request(f"r{i}", tenant=f"t{i}", prompt_tokens=8, max_tokens=2) for i in range(4)])
    driver.run()
    sample = registry.get_sample_value
    assert sample("fairserve:served_tokens_total", {"tenant": "t0", "kind": "output"}) == 2
    assert sample("fairserve:served_tokens_total", {"tenant": "t2", "kind": "output"}) is None
    assert sample("fairserve:served_tokens_total", {"tenant": "_other", "kind": "output"}) == 4  # t2 + t3
    # A client abort that empties the engine is published at once (the engine blocks after it).
    driver.add(make_request("gone", tenant="t0", prompt_tokens=8, max_tokens=50))
    driver.step()
    assert scheduler.publish_metrics().tenant("t0").running == 1
    assert sample("fairserve:requests", {"tenant": "t0", "state": "running"}) == 1
    scheduler.finish_requests("gone", RequestStatus.FINISHED_ABORTED)
    assert sample("fairserve:requests", {"tenant": "t0", "state": "running"}) == 0


def test_metrics_settings_are_checked_at_construction(tiny_model_dir, monkeypatch):
    from vllm_fairserve.config import FairServeConfigError

    with pytest.raises(FairServeConfigError, match=r"fairserve_metrics\.publish_interval_s = 0"):
        build(tiny_model_dir, additional_config={"fairserve_metrics": {"publish_interval_s": 0}})
    with pytest.raises(FairServeConfigError, match=r"fairserve_metrics\.file: unknown key"):
        build(tiny_model_dir, additional_config={"fairserve_metrics": {"file": "/tmp/x.json"}})
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    with pytest.raises(FairServeConfigError, match="PROMETHEUS_MULTIPROC_DIR is not set"):
        build(tiny_model_dir, additional_config={"fairserve_metrics": {"prometheus": True}})
    assert build(tiny_model_dir).metrics.exporter is None  # auto: no multiprocess dir, no exporter


# ------------------------------------------------------------------------ nothing is lost


@MODES
def test_no_request_is_lost(tiny_model_dir, mode):
    """Random tenants, holds, deadlines, preemptions and client aborts: every request added
    ends exactly once, with a finish reason the client sees or by the client's own abort."""
    from vllm.v1.request import RequestStatus

    rng = random.Random(6)
    fairserve = {**TIGHT_THROTTLE, "throttle": {**TIGHT_THROTTLE["throttle"], "max_hold_s": 20}}
    scheduler, driver = build_mode(tiny_model_dir, mode, fairserve=fairserve, num_blocks=12, max_num_seqs=6,
                                   max_num_batched_tokens=96)
    clock = scheduler.clock = Clock()
    added, client_aborted = [], set()
    for step in range(400):
        if step < 300 and rng.random() < 0.5:
            request_id = f"r{len(added)}"
            tenant = rng.choice(["t0", "t1", "t2", "t3", "heavy"])
            application = "chat" if rng.random() < 0.5 else None
            call_index = 1 if rng.random() < 0.1 else None  # a follow-up call: never held
            driver.add(make_request(request_id, tenant=tenant, application=application, call_index=call_index,
                                    prompt_tokens=rng.randint(4, 60), max_tokens=rng.randint(1, 40)))
            added.append(request_id)
        if added and rng.random() < 0.05:
            victim = rng.choice(added)
            if victim not in driver.finished and victim not in client_aborted and victim in scheduler.requests:
                scheduler.finish_requests(victim, RequestStatus.FINISHED_ABORTED)
                client_aborted.add(victim)
        clock.now += rng.choice([0.0, 0.5, 2.0])
        driver.step()
    clock.now += 100  # every hold either released (window passed) or past its deadline
    driver.run()

    assert not scheduler.requests and not scheduler.held_request_ids() and not scheduler.has_requests()
    assert len(scheduler.waiting) == 0 and not scheduler.running
    ended = set(driver.finished) | client_aborted
    assert ended == set(added) and not (set(driver.finished) & client_aborted)
    reasons = {reason.name for reason, _ in driver.finished.values()}
    assert reasons <= {"LENGTH", "ABORT"}
    for request_id, (reason, stop_reason) in driver.finished.items():
        if reason.name == "ABORT":
            assert isinstance(stop_reason, str) and stop_reason.startswith("throttled:"), request_id
    stats = scheduler.throttle.stats()
    assert sum(s.held for s in stats.values()) > 0, "the scenario should exercise the throttle"
    assert driver.preempted, "the scenario should exercise preemption"
    for tenant_stats in stats.values():
        assert tenant_stats.holding == 0
        assert tenant_stats.submitted == (tenant_stats.admitted + tenant_stats.released + tenant_stats.expired
                                          + tenant_stats.cancelled)
    assert not scheduler.counters.active_tenants()


# -------------------------------------------------------------------------- end to end


# vLLM 0.32's engine client closes its zmq sockets on shutdown but never terminates the context.
@pytest.mark.filterwarnings("ignore:Unclosed context:ResourceWarning")
def test_offline_llm_serves_two_tenants_with_the_fair_scheduler(tiny_model_dir, capfd):
    from vllm import LLM, SamplingParams

    fairserve = {"tenants": [{"id": "gold", "weight": 2}], "throttle": {"enabled": False}}
    llm = LLM(model=str(tiny_model_dir), dtype="float32", max_model_len=256, max_num_seqs=4, seed=0,
              scheduler_cls="vllm_fairserve.FairScheduler", additional_config={"fairserve": fairserve})
    try:
        prompts, params = [], []
        for index in range(6):
            tenant = "gold" if index % 2 else "silver"
            prompts.append(f"Request {index} from {tenant}:")
            params.append(SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True,
                                         extra_args={"tenant": tenant}))
        outputs = llm.generate(prompts, params, use_tqdm=False)
    finally:
        llm.llm_engine.engine_core.shutdown()
    assert len(outputs) == 6
    for output in outputs:
        assert output.finished and len(output.outputs[0].token_ids) == 8
        assert output.outputs[0].finish_reason == "length"
    captured = capfd.readouterr()
    log = captured.out + captured.err  # vLLM logs to stdout by default, from the engine-core process
    assert "Using custom scheduler class vllm_fairserve.FairScheduler" in log
    # Our own line, from the scheduler's constructor in the engine-core process: the block arrived.
    assert "fairserve: FairScheduler active" in log and "1 weighted tenants" in log and "throttle off" in log
