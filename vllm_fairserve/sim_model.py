"""The simulator's data: the engine's shape and cost model, a simulated request, a run's result.

Shared by the engine (``sim.py``) and the policies (``sim_policies.py``), so neither imports the
other's module for its types.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from vllm_fairserve.identity import RequestIdentity
from vllm_fairserve.workload import Interaction, UserClass

# --------------------------------------------------------------------------------------------
# The engine's shape and cost model
#
# Defaults model one NVIDIA A10G (24 GB) serving Llama-2-7B in fp16 with vLLM, the setting of
# VTC's experiments (Sheng et al., OSDI'24). They come from the hardware's roofline, not from a
# measurement, and land at 1-2k tokens/s for mixed traffic: the same order as the tiny model
# on this 2-core machine (~1,400 tok/s offline, DESIGN.md section 2), so trace rates carry over.

#: Fixed cost of one step (s): every step reads all 13.5 GB of fp16 weights once; at the A10G's
#: 600 GB/s that is ~22 ms, whatever the batch size.
DEFAULT_STEP_FIXED_S = 0.022
#: Marginal cost of one token in a step (s): 2 x 6.7e9 FLOP per token at ~67 TFLOP/s, the rate
#: an A10G's fp16 tensor cores sustain on large prefill batches.
DEFAULT_STEP_PER_TOKEN_S = 0.0002
#: vLLM's default KV block size (tokens).
DEFAULT_BLOCK_SIZE = 16
#: KV blocks: 24 GB x 0.9 (vLLM's gpu_memory_utilization) - 13.5 GB of weights - ~2 GB of
#: activations leaves ~6 GB; a token's KV is 2 (K, V) x 32 layers x 4096 x 2 bytes = 0.5 MiB,
#: so ~12k tokens = 768 blocks of 16.
DEFAULT_NUM_KV_BLOCKS = 768
#: vLLM V1's default seat count on GPU.
DEFAULT_MAX_NUM_SEQS = 256
#: vLLM V1's default step token budget for online serving on GPUs under 70 GiB.
DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048
#: Llama-2's context length (tokens): prompt plus output must fit it.
DEFAULT_MAX_MODEL_LEN = 4096
#: How often (s of simulated time) per-tenant service and backlog are recorded for the metrics:
#: fine enough to see a one-second TTFT difference, coarse enough to keep 1,000 tenants cheap.
DEFAULT_SAMPLE_INTERVAL_S = 1.0

MICROSECONDS_PER_SECOND = 1_000_000


def _us(seconds: float) -> int:
    return round(seconds * MICROSECONDS_PER_SECOND)


def _s(microseconds: int) -> float:
    return microseconds / MICROSECONDS_PER_SECOND


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Engine limits and step cost; every field is named as in vLLM where vLLM has it."""

    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS
    max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS
    block_size: int = DEFAULT_BLOCK_SIZE
    num_kv_blocks: int = DEFAULT_NUM_KV_BLOCKS
    max_model_len: int = DEFAULT_MAX_MODEL_LEN
    step_fixed_s: float = DEFAULT_STEP_FIXED_S
    step_per_token_s: float = DEFAULT_STEP_PER_TOKEN_S
    sample_interval_s: float = DEFAULT_SAMPLE_INTERVAL_S
    #: vLLM's admission gate (``SchedulerConfig.scheduler_reserve_full_isl``, on by default in
    #: 0.32): a waiting request joins only if the free KV blocks hold its whole prompt (plus
    #: any output it replays after a preemption), not just its first prefill chunk. Without it a
    #: long prompt is admitted into a nearly full cache, its second chunk finds no blocks, and
    #: the preemption throws its first chunk away, again and again ("KV cache thrashing").
    scheduler_reserve_full_isl: bool = True
    fast_forward: bool = True  # False steps one by one; kept to verify that both agree

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "num_kv_blocks", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} = {getattr(self, name)}: must be >= 1")
        for name in ("step_per_token_s", "sample_interval_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"EngineConfig.{name} = {getattr(self, name)}: must be > 0 seconds")
        if self.step_fixed_s < 0:
            raise ValueError(f"EngineConfig.step_fixed_s = {self.step_fixed_s}: must be >= 0 seconds")
        if self.max_num_batched_tokens < self.max_num_seqs:
            # As vLLM: otherwise a full batch of decodes could not all be scheduled in one step.
            raise ValueError(
                f"EngineConfig.max_num_batched_tokens = {self.max_num_batched_tokens}: must be >= "
                f"max_num_seqs = {self.max_num_seqs}"
            )
        if self.max_model_len > self.kv_capacity_tokens:
            raise ValueError(
                f"EngineConfig.max_model_len = {self.max_model_len}: exceeds the KV cache "
                f"({self.num_kv_blocks} blocks x {self.block_size} = {self.kv_capacity_tokens} tokens), so one "
                "request could never run; lower it or add blocks"
            )

    @property
    def kv_capacity_tokens(self) -> int:
        """Tokens the whole KV cache holds: VTC's M, the most tokens a running batch can hold."""
        return self.num_kv_blocks * self.block_size


# --------------------------------------------------------------------------------------------
# Requests and their fate


class EndReason(str, enum.Enum):
    """How a request left the system; every request ends with exactly one."""

    FINISHED = "finished"
    RATE_LIMITED = "rate_limited"  # refused at arrival by a per-user RPM limit
    HOLD_EXPIRED = "hold_expired"  # held by the throttle past its deadline
    TOO_LONG = "too_long"  # prompt + output exceed max_model_len


class Admission(enum.Enum):
    """A policy's answer to an arriving request."""

    ADMIT = "admit"  # into the waiting queue now
    HOLD = "hold"  # kept aside; it leaves through step_start (released or expired)
    REJECT = "reject"  # ended now, with the policy's reason


@dataclass(eq=False, slots=True)  # hashed by identity, as vLLM's Request
class SimRequest:
    """One LLM call and everything that happens to it (times in seconds)."""

    id: int
    identity: RequestIdentity
    user_class: UserClass
    tenant_index: int
    arrival_time: float  # submission time; the fair queue breaks ties by it
    system_tokens: int
    input_tokens: int
    output_tokens: int
    interaction: Interaction
    prompt_tokens: int = field(init=False)
    computed: int = 0  # tokens whose KV is in the cache
    generated: int = 0  # output tokens sampled so far
    blocks: int = 0  # KV blocks held
    prompt_served: int = 0  # prompt tokens computed at least once (recomputation is not service)
    held: bool = False  # ever held by the throttle
    queued_time: float | None = None  # first entry into the waiting queue
    first_token_time: float | None = None
    end_time: float | None = None
    end_reason: EndReason | None = None
    end_message: str = ""
    preemptions: int = 0

    def __post_init__(self) -> None:
        self.prompt_tokens = self.system_tokens + self.input_tokens

    @property
    def tenant(self) -> str:
        return self.identity.tenant

    @property
    def remaining(self) -> int:
        """Tokens to compute before the next token can be sampled (1 while decoding)."""
        return self.prompt_tokens + self.generated - self.computed

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


def _identity_of(request: SimRequest) -> RequestIdentity:
    return request.identity


# --------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True, slots=True)
class Sample:
    """The engine at one sampling tick."""

    time_s: float
    tokens_served: int  # prompt tokens computed once + output tokens, all tenants, since t=0
    service: tuple[float, ...]  # per tenant index: VTC's service W = 1 * prompt + 2 * output tokens
    backlogged: frozenset[int]  # tenant indexes with requests waiting throughout the last interval


@dataclass(frozen=True, slots=True)
class SimResult:
    """Everything a run produced; metrics are computed from it (``sim_metrics``)."""

    policy: str
    requests: tuple[SimRequest, ...]  # every request submitted, in submission order
    tenants: tuple[str, ...]  # tenant index -> id
    tenant_classes: tuple[UserClass, ...]
    tenant_weights: tuple[float, ...]
    samples: tuple[Sample, ...]
    engine: EngineConfig
    horizon_s: float  # the workload's duration: no interaction starts later
    end_s: float  # when the last request ended
    steps: int  # engine steps taken (a fast-forward of k steps counts k)
    busy_s: float  # simulated time spent in steps; work-conserving: the time some request was queued or running
    abandoned_interactions: int  # interactions whose remaining calls were not sent (a call ended unfinished)


#: Price of a prompt and of an output token in the service measure, as VTC defines service.
SERVICE_INPUT_PRICE = 1.0
SERVICE_OUTPUT_PRICE = 2.0
