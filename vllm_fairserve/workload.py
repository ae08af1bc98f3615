"""Multi-tenant LLM traffic for the simulator, seeded and deterministic.

A workload is a list of *interactions*: one user action, which makes one LLM call (chat, code
completion, summarisation, RAG, long-form writing) or several (an agent plans, calls tools and
answers). Only an interaction's first call has a fixed arrival time; each follow-up call is
sent by the simulator a short tool/think gap after the previous call finished, because an
agent cannot issue its next call before it has read the last answer. A workload therefore
fixes *what* every user asks and *when each interaction starts*, and every policy replays
exactly that.

Users differ in their application, their arrival process (Poisson, or on/off bursts with the
same mean rate) and their behaviour: well-behaved users ask at their application's declared
rate; abusive users flood (10x the rate), split one large request into many small ones, or
send prompts far longer than their application's shape.

Each application's *declared characteristic* (``ApplicationShape.to_config``) is exactly the
mean of what its well-behaved users send, so the FairServe config built from a workload
describes its legitimate traffic truthfully and nothing more.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from vllm_fairserve.config import SECONDS_PER_MINUTE

# --------------------------------------------------------------------------------------------
# Applications


@dataclass(frozen=True, slots=True)
class TokenRange:
    """Token counts drawn uniformly from ``[low, high]``; the declared shape is the mean."""

    low: int
    high: int

    def __post_init__(self) -> None:
        if not 0 <= self.low <= self.high:
            raise ValueError(f"TokenRange(low={self.low}, high={self.high}): need 0 <= low <= high")

    @property
    def mean(self) -> int:
        """Expected tokens (rounded down), as declared in the application's config."""
        return (self.low + self.high) // 2

    def draw(self, rng: random.Random) -> int:
        return rng.randint(self.low, self.high)


@dataclass(frozen=True, slots=True)
class ApplicationShape:
    """What one call of an application looks like, and how often a legitimate user calls."""

    id: str
    input_tokens: TokenRange  # user turn, code context, document, retrieved passages (tokens)
    system_tokens: int  # fixed instructions / tool descriptions in front of every call (tokens)
    output_tokens: TokenRange  # generated tokens
    interactions_per_minute: float  # mean rate of one well-behaved user
    calls_per_interaction: int = 1
    call_gap_s: float = 0.0  # tool or think time between a call's end and the next call (s)

    def to_config(self) -> dict[str, Any]:
        """The ``fairserve.applications[]`` entry declaring this shape."""
        return {
            "id": self.id,
            "expected_input_tokens": self.input_tokens.mean,
            "expected_system_tokens": self.system_tokens,
            "expected_output_tokens": self.output_tokens.mean,
            "calls_per_interaction": self.calls_per_interaction,
            "interactions_per_minute": self.interactions_per_minute,
        }


# The shapes below are typical of each kind of traffic, and every prompt plus output fits a
# 4,096-token context (Llama-2's, the simulator's default max_model_len).

#: A person chatting: a turn with its context, an answer of the same order (ShareGPT-like), about
#: one turn every 10 s while reading. The same shape as the config's implicit default application.
CHAT = ApplicationShape(
    "chat", TokenRange(64, 448), 0, TokenRange(64, 448), interactions_per_minute=6.0
)
#: An editor completing code on typing pauses: short context, a line or two back, often.
CODE_COMPLETION = ApplicationShape(
    "code", TokenRange(32, 224), 0, TokenRange(8, 56), interactions_per_minute=20.0
)
#: Summarising a document: long in, short out, a document every minute or so.
SUMMARISATION = ApplicationShape(
    "summarise", TokenRange(1024, 3072), 64, TokenRange(64, 256), interactions_per_minute=1.0
)
#: Retrieval-augmented QA: retrieved passages and the question in, a paragraph out.
RAG = ApplicationShape(
    "rag", TokenRange(768, 1792), 128, TokenRange(128, 384), interactions_per_minute=3.0
)
#: Long-form writing (reports, stories): short in, long out. Heavy, yet legitimate.
WRITING = ApplicationShape(
    "writing", TokenRange(64, 192), 0, TokenRange(512, 1536), interactions_per_minute=1.0
)
#: A tool-using agent: four calls per user action (plan, two tool rounds, answer), each with the
#: tool descriptions as system prompt and a 1 s tool call between calls. Heavy, yet legitimate.
AGENT = ApplicationShape(
    "agent", TokenRange(128, 640), 512, TokenRange(32, 224), interactions_per_minute=2.0,
    calls_per_interaction=4, call_gap_s=1.0,
)

STANDARD_APPLICATIONS: tuple[ApplicationShape, ...] = (CHAT, CODE_COMPLETION, SUMMARISATION, RAG, WRITING, AGENT)

# --------------------------------------------------------------------------------------------
# Users


class UserClass(str, enum.Enum):
    """How a user is reported in the metrics."""

    WELL_BEHAVED = "well_behaved"
    ABUSIVE = "abusive"


class Abuse(str, enum.Enum):
    """The ways an abusive user misuses its application."""

    NONE = "none"
    FLOOD = "flood"  # FLOOD_RATE_MULTIPLIER times the application's rate
    SPLIT = "split"  # each interaction is one document SPLIT_PIECES times too large, sent in pieces
    LONG_PROMPT = "long_prompt"  # prompts of LONG_PROMPT_TOKENS whatever the application's shape


#: A flooding user sends this many times its application's rate (the issue's "10x flood").
FLOOD_RATE_MULTIPLIER = 10.0
#: A splitting user cuts a document this many times the application's size into this many
#: application-sized pieces and sends them at once, each as a new interaction: the same tokens
#: as one over-long request, but every piece looks legitimate on its own.
SPLIT_PIECES = 16
#: Prompt length (tokens) of long-prompt abuse: nearly the whole 4,096-token context on every
#: call, whatever the application expects.
LONG_PROMPT_TOKENS = TokenRange(3000, 3500)


@dataclass(frozen=True, slots=True)
class OnOff:
    """Bursty arrivals: exponentially distributed on and off periods (seconds). During an on
    period interactions arrive at ``rate / duty``, so the mean rate is the same as Poisson's."""

    mean_on_s: float
    mean_off_s: float

    def __post_init__(self) -> None:
        if self.mean_on_s <= 0 or self.mean_off_s < 0:
            raise ValueError(f"OnOff(mean_on_s={self.mean_on_s}, mean_off_s={self.mean_off_s}): need on > 0, off >= 0")

    @property
    def duty(self) -> float:
        """Fraction of time spent on."""
        return self.mean_on_s / (self.mean_on_s + self.mean_off_s)


@dataclass(frozen=True, slots=True)
class UserSpec:
    """One user (tenant) of one application."""

    tenant: str
    application: str  # an ApplicationShape id
    rate_multiplier: float = 1.0  # times the application's interactions_per_minute
    abuse: Abuse = Abuse.NONE
    bursts: OnOff | None = None  # None: Poisson arrivals
    weight: float = 1.0  # the tenant's share in FairServe's config (and weighted VTC)
    start_s: float = 0.0  # first moment the user may start an interaction
    end_s: float | None = None  # last moment (None: the workload's duration)

    @property
    def user_class(self) -> UserClass:
        return UserClass.WELL_BEHAVED if self.abuse is Abuse.NONE else UserClass.ABUSIVE


# --------------------------------------------------------------------------------------------
# The generated trace


@dataclass(frozen=True, slots=True)
class Call:
    """One LLM call of an interaction."""

    system_tokens: int
    input_tokens: int
    output_tokens: int  # the call generates exactly this many tokens (no early stop)


@dataclass(frozen=True, slots=True)
class Interaction:
    """One user action; its calls run one after the other."""

    id: str
    tenant: str
    application: str
    user_class: UserClass
    start_s: float  # arrival of the first call
    calls: tuple[Call, ...]
    call_gap_s: float  # between a call's end and the next call's arrival


@dataclass(frozen=True, slots=True)
class Workload:
    """A seeded trace: interactions ordered by start time, and who the tenants are."""

    interactions: tuple[Interaction, ...]
    applications: dict[str, ApplicationShape]
    tenant_classes: dict[str, UserClass]
    tenant_weights: dict[str, float]
    duration_s: float  # no interaction starts after this
    seed: int

    @property
    def num_calls(self) -> int:
        return sum(len(interaction.calls) for interaction in self.interactions)

    def fairserve_config(self, throttle: dict[str, Any] | None = None) -> dict[str, Any]:
        """A ``fairserve`` block that declares this workload's applications and tenant weights
        truthfully (the operator knows its applications; it does not know who will abuse them)."""
        block: dict[str, Any] = {
            "applications": [shape.to_config() for shape in self.applications.values()],
            "tenants": [{"id": t, "weight": w} for t, w in self.tenant_weights.items() if w != 1.0],
        }
        if throttle:
            block["throttle"] = throttle
        return block


@dataclass(slots=True)
class _IdCounter:
    next: dict[str, int] = field(default_factory=dict)

    def take(self, tenant: str) -> str:
        index = self.next.get(tenant, 0)
        self.next[tenant] = index + 1
        return f"{tenant}/i{index}"


def generate_workload(
    users: Sequence[UserSpec],
    duration_s: float,
    seed: int,
    applications: Iterable[ApplicationShape] = STANDARD_APPLICATIONS,
) -> Workload:
    """Draw every user's interactions over ``[0, duration_s)``; the same arguments give the
    same workload. Each user draws from its own generator seeded by (seed, position), so adding
    a user does not change what the others send."""
    if duration_s <= 0:
        raise ValueError(f"duration_s = {duration_s}: must be > 0")
    shapes = {shape.id: shape for shape in applications}
    classes: dict[str, UserClass] = {}
    weights: dict[str, float] = {}
    interactions: list[Interaction] = []
    ids = _IdCounter()
    for position, user in enumerate(users):
        if user.application not in shapes:
            raise ValueError(
                f"users[{position}].application = {user.application!r}: unknown; known: {', '.join(shapes)}"
            )
        if user.tenant in classes and (classes[user.tenant], weights[user.tenant]) != (user.user_class, user.weight):
            raise ValueError(
                f"users[{position}].tenant = {user.tenant!r}: already used with another class or weight; "
                "a tenant's users must share both"
            )
        if user.rate_multiplier <= 0:
            raise ValueError(f"users[{position}].rate_multiplier = {user.rate_multiplier}: must be > 0")
        classes[user.tenant] = user.user_class
        weights[user.tenant] = user.weight
        rng = random.Random(seed * 1_000_003 + position)
        shape = shapes[user.application]
        end_s = duration_s if user.end_s is None else min(user.end_s, duration_s)
        for start in _arrivals(user, shape, end_s, rng):
            interactions.extend(_interactions_at(user, shape, start, rng, ids))
    interactions.sort(key=lambda interaction: (interaction.start_s, interaction.id))
    return Workload(tuple(interactions), shapes, classes, weights, duration_s, seed)


def _arrivals(user: UserSpec, shape: ApplicationShape, end_s: float, rng: random.Random) -> list[float]:
    rate_per_s = shape.interactions_per_minute * user.rate_multiplier / SECONDS_PER_MINUTE
    if user.abuse is Abuse.FLOOD:
        rate_per_s *= FLOOD_RATE_MULTIPLIER
    times: list[float] = []
    now = user.start_s
    if user.bursts is None:
        while True:
            now += rng.expovariate(rate_per_s)
            if now >= end_s:
                return times
            times.append(now)
    on_rate = rate_per_s / user.bursts.duty
    while now < end_s:
        on_end = now + rng.expovariate(1.0 / user.bursts.mean_on_s)
        while True:
            now += rng.expovariate(on_rate)
            if now >= min(on_end, end_s):
                break
            times.append(now)
        now = on_end + (rng.expovariate(1.0 / user.bursts.mean_off_s) if user.bursts.mean_off_s > 0 else 0.0)
    return times


def _interactions_at(
    user: UserSpec, shape: ApplicationShape, start: float, rng: random.Random, ids: _IdCounter
) -> list[Interaction]:
    def make(calls: tuple[Call, ...]) -> Interaction:
        return Interaction(ids.take(user.tenant), user.tenant, shape.id, user.user_class, start, calls,
                           shape.call_gap_s)

    if user.abuse is Abuse.SPLIT:
        # One document SPLIT_PIECES times the application's size, in application-sized pieces.
        return [
            make((Call(shape.system_tokens, shape.input_tokens.draw(rng), shape.output_tokens.draw(rng)),))
            for _ in range(SPLIT_PIECES)
        ]
    input_range = LONG_PROMPT_TOKENS if user.abuse is Abuse.LONG_PROMPT else shape.input_tokens
    calls = tuple(
        Call(shape.system_tokens, input_range.draw(rng), shape.output_tokens.draw(rng))
        for _ in range(shape.calls_per_interaction)
    )
    return [make(calls)]
