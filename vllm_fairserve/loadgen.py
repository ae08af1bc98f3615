"""Multi-tenant load against a live OpenAI-compatible vLLM server, and the server itself.

The live-server test and ``benchmarks/fairserve_live.py`` share this module, so the scenario the
test asserts on is the one the benchmark measures. It talks to the server only through HTTP
(the ``openai`` client, streaming, so the first token's arrival is seen), never through vLLM's
Python API, and it starts the server with the command users run (``python -m
vllm_fairserve.launch``), so what is measured is what is deployed.

Load shape. Every tenant has its own ``AsyncOpenAI`` client (its own connection pool, as a
separate customer would). A *flooder* is closed-loop: ``concurrency`` workers each send the next
request as soon as the previous one ends, which keeps the engine saturated and its queue full
whatever the scheduler does. A *well-behaved* tenant is open-loop: Poisson arrivals at
``rate_per_s``, independent of how fast it is served, as people typing are. Prompts are random
token ids (exact lengths, no accidental prefix-cache hits) and ``ignore_eos`` makes every
request decode exactly ``max_tokens``.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import math
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
#: The scheduler class ``vllm serve`` uses when none is named: the FCFS baseline.
STOCK_SCHEDULER_CLS = "vllm.v1.core.sched.scheduler.Scheduler"
FAIR_SCHEDULER_CLS = "vllm_fairserve.FairScheduler"
#: Tiny-model servers start in ~30 s on 2 cores; a busy machine can triple that.
START_TIMEOUT_S = 240.0
#: Token ids prompts are drawn from: inside every tiny_llama vocabulary, past special tokens.
PROMPT_TOKEN_RANGE = (300, 1000)
FLOODER = "flooder"
WELL_BEHAVED = "well_behaved"


# ---------------------------------------------------------------------------------- server


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def log_tail(log_path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc})"


class ServerStartError(RuntimeError):
    """The server exited or did not answer /health in time; the message carries its log tail."""


@dataclass
class LiveServer:
    """A running server: where it listens and where it logs."""

    port: int
    log_path: Path
    process: subprocess.Popen

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def get(self, path: str, timeout_s: float = 10.0) -> str:
        with urllib.request.urlopen(self.base_url + path, timeout=timeout_s) as response:
            return response.read().decode()

    def model_id(self) -> str:
        return json.loads(self.get("/v1/models"))["data"][0]["id"]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def server_command(model_dir: Path | str, port: int, scheduler_cls: str, max_num_seqs: int,
                   additional_config: Mapping[str, Any] | None = None,
                   extra_args: Sequence[str] = ()) -> list[str]:
    """The launcher command line (the README's command, on loopback, with a fixed seed)."""
    command = [
        sys.executable, "-m", "vllm_fairserve.launch", str(model_dir),
        "--host", HOST, "--port", str(port), "--scheduler-cls", scheduler_cls,
        "--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", str(max_num_seqs), "--seed", "0",
    ]
    if additional_config:
        command += ["--additional-config", json.dumps(dict(additional_config))]
    return [*command, *extra_args]


PR_SET_PDEATHSIG = 1  # prctl(2) option: the signal a child gets when its parent dies


def _terminate_with_parent() -> None:
    """In the server process before exec: SIGTERM it when the process that started it dies.

    The ``with`` block stops the server when the block ends; a test run or benchmark killed from
    outside (a timeout's SIGKILL) runs no cleanup, and its servers (gigabytes each) would live
    on as orphans, slowing every later measurement on the machine.
    """
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@contextmanager
def live_server(model_dir: Path | str, log_path: Path, *, scheduler_cls: str = FAIR_SCHEDULER_CLS,
                max_num_seqs: int = 8, additional_config: Mapping[str, Any] | None = None,
                extra_args: Sequence[str] = (), start_timeout_s: float = START_TIMEOUT_S) -> Iterator[LiveServer]:
    """Start the server in its own process group, wait for /health, stop it (and its engine
    process) on exit however the block ends."""
    port = free_port()
    command = server_command(model_dir, port, scheduler_cls, max_num_seqs, additional_config, extra_args)
    env = dict(os.environ)
    env.setdefault("VLLM_LOGGING_LEVEL", "INFO")
    project_root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(project_root), env.get("PYTHONPATH", "")) if p)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, cwd=project_root, start_new_session=True,
                                   preexec_fn=_terminate_with_parent)
    server = LiveServer(port, log_path, process)
    try:
        deadline = time.monotonic() + start_timeout_s
        while not _healthy(port):
            if process.poll() is not None:
                raise ServerStartError(f"server exited with {process.returncode} before /health answered:\n"
                                       f"{log_tail(log_path)}")
            if time.monotonic() > deadline:
                raise ServerStartError(f"server not healthy after {start_timeout_s:.0f} s:\n{log_tail(log_path)}")
            time.sleep(0.5)
        yield server
    finally:
        stop_process_group(process)


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, OSError):
        return False


def stop_process_group(process: subprocess.Popen) -> None:
    """End a process started with ``start_new_session`` and everything it spawned, bounded."""
    for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        if process.poll() is not None:
            break
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
    try:  # children may outlive the leader briefly
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# ------------------------------------------------------------------------------------ load


@dataclass(frozen=True, slots=True)
class TenantLoad:
    """One tenant's traffic: closed-loop (``concurrency``) or Poisson (``rate_per_s``)."""

    tenant: str
    kind: str  # FLOODER or WELL_BEHAVED: how results are grouped
    prompt_tokens: int
    max_tokens: int
    concurrency: int = 0  # closed loop: requests kept in flight
    rate_per_s: float = 0.0  # open loop: mean arrivals per second

    def __post_init__(self) -> None:
        if (self.concurrency > 0) == (self.rate_per_s > 0):
            raise ValueError(f"tenant {self.tenant!r}: give exactly one of concurrency > 0 or rate_per_s > 0 "
                             f"(got concurrency={self.concurrency}, rate_per_s={self.rate_per_s})")
        if self.kind not in (FLOODER, WELL_BEHAVED):
            raise ValueError(f"tenant {self.tenant!r}: kind = {self.kind!r}; valid: {FLOODER!r}, {WELL_BEHAVED!r}")
        if self.prompt_tokens < 1 or self.max_tokens < 1:
            raise ValueError(f"tenant {self.tenant!r}: prompt_tokens and max_tokens must be >= 1")


def flood_scenario(*, flooder_concurrency: int, well_behaved: int, rate_per_s: float,
                   flood_tokens: tuple[int, int] = (64, 64),
                   polite_tokens: tuple[int, int] = (32, 32)) -> list[TenantLoad]:
    """One closed-loop flooder (``flood_tokens`` = (prompt, output)) beside ``well_behaved``
    Poisson tenants at ``rate_per_s`` each: the scenario the test and the benchmark share."""
    return [TenantLoad("flooder", FLOODER, *flood_tokens, concurrency=flooder_concurrency)] + [
        TenantLoad(f"user{index}", WELL_BEHAVED, *polite_tokens, rate_per_s=rate_per_s)
        for index in range(well_behaved)
    ]


@dataclass(slots=True)
class RequestRecord:
    """What the client saw of one request (times in seconds since the load started)."""

    tenant: str
    kind: str
    sent_s: float
    max_tokens: int
    first_token_s: float | None = None
    end_s: float | None = None
    output_tokens: int = 0  # from the final usage chunk
    finish_reason: str | None = None
    error: str | None = None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.sent_s

    @property
    def completed(self) -> bool:
        """Ended normally: a finish reason and the usage vLLM reports, no error."""
        return self.error is None and self.finish_reason is not None and self.end_s is not None

    @property
    def lost(self) -> bool:
        """No complete answer: an error, or a stream that ended without a finish reason. A
        request the throttle ended (finish reason ``abort``, with a reason) is not lost."""
        return not self.completed


@dataclass
class LoadResult:
    """Every request of one load run, and the window the load was applied in."""

    records: list[RequestRecord]
    duration_s: float  # the window during which new requests were sent
    drained_s: float  # when the last request ended
    tenants: tuple[TenantLoad, ...] = ()


def _prompt(rng: random.Random, tokens: int) -> list[int]:
    return [rng.randrange(*PROMPT_TOKEN_RANGE) for _ in range(tokens)]


async def _one_request(client: Any, model: str, load: TenantLoad, prompt: list[int], started: float,
                       records: list[RequestRecord], request_timeout_s: float) -> None:
    record = RequestRecord(load.tenant, load.kind, time.perf_counter() - started, load.max_tokens)
    records.append(record)
    try:
        stream = await client.completions.create(
            model=model, prompt=prompt, max_tokens=load.max_tokens, temperature=0.0, stream=True,
            stream_options={"include_usage": True}, timeout=request_timeout_s,
            # One chunk for the first token, one at the end: the client and the API server then
            # spend their CPU on requests, not on per-token events, and TTFT stays exact (vLLM
            # always sends the first token at once).
            extra_body={"ignore_eos": True, "stream_interval": load.max_tokens, "vllm_xargs": {"tenant": load.tenant}},
        )
        async for chunk in stream:
            now = time.perf_counter() - started
            if chunk.choices:
                if record.first_token_s is None:
                    record.first_token_s = now
                if chunk.choices[0].finish_reason is not None:
                    record.finish_reason = chunk.choices[0].finish_reason
            if chunk.usage is not None:
                record.output_tokens = chunk.usage.completion_tokens
        record.end_s = time.perf_counter() - started
    except Exception as exc:  # noqa: BLE001 - every failure is recorded as this request's error
        record.error = f"{type(exc).__name__}: {exc}"[:300]
        record.end_s = time.perf_counter() - started


async def run_load(base_url: str, model: str, tenants: Sequence[TenantLoad], duration_s: float, *, seed: int = 0,
                   request_timeout_s: float = 300.0,
                   on_request_done: Callable[[], None] | None = None) -> LoadResult:
    """Apply ``tenants``' traffic for ``duration_s`` seconds, then wait for every request sent.

    ``on_request_done`` is called after each request (a progress bar's ``update``).
    """
    from openai import AsyncOpenAI

    if duration_s <= 0:
        raise ValueError(f"duration_s = {duration_s}: must be > 0")
    rng = random.Random(seed)
    records: list[RequestRecord] = []
    clients = [AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0) for _ in tenants]
    started = time.perf_counter()
    stop_at = started + duration_s

    async def tracked(client: Any, load: TenantLoad, prompt: list[int]) -> None:
        await _one_request(client, model, load, prompt, started, records, request_timeout_s)
        if on_request_done is not None:
            on_request_done()

    async def closed_loop(client: Any, load: TenantLoad, worker_rng: random.Random) -> None:
        while time.perf_counter() < stop_at:
            await tracked(client, load, _prompt(worker_rng, load.prompt_tokens))

    async def open_loop(client: Any, load: TenantLoad, tenant_rng: random.Random) -> None:
        in_flight: list[asyncio.Task] = []
        next_at = started + tenant_rng.expovariate(load.rate_per_s)
        while next_at < stop_at:
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            in_flight.append(asyncio.create_task(tracked(client, load, _prompt(tenant_rng, load.prompt_tokens))))
            next_at += tenant_rng.expovariate(load.rate_per_s)
        await asyncio.gather(*in_flight)

    jobs = []
    for client, load in zip(clients, tenants):
        if load.concurrency:
            jobs += [closed_loop(client, load, random.Random(rng.random())) for _ in range(load.concurrency)]
        else:
            jobs.append(open_loop(client, load, random.Random(rng.random())))
    try:
        await asyncio.gather(*jobs)
    finally:
        for client in clients:
            await client.close()
    return LoadResult(records, duration_s, time.perf_counter() - started, tuple(tenants))


# --------------------------------------------------------------------------------- figures


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100), linear between order statistics; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def jain_index(values: Sequence[float]) -> float | None:
    """(sum x)^2 / (n sum x^2): 1 when all equal, 1/n when one gets everything."""
    if not values or not any(values):
        return None
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values))


def max_min_fair_shares(demands: Mapping[str, float], capacity: float) -> dict[str, float]:
    """Water-filling: tenants demanding less than an equal split get their demand, the rest
    share what is left equally (``math.inf`` demand = always backlogged)."""
    shares: dict[str, float] = {}
    left, remaining = capacity, dict(demands)
    while remaining:
        equal = left / len(remaining)
        satisfied = {t: d for t, d in remaining.items() if d <= equal}
        if not satisfied:
            shares.update({t: equal for t in remaining})
            break
        for tenant, demand in satisfied.items():
            shares[tenant] = demand
            left -= demand
            del remaining[tenant]
    return shares


@dataclass(frozen=True)
class LoadFigures:
    """The issue's per-policy record (``to_json``) plus what the benchmark also reports."""

    ttft_p50_s: dict[str, float | None]
    ttft_p99_s: dict[str, float | None]
    throughput_tok_s: float
    jain: float | None
    lost: int
    requests: dict[str, int] = field(default_factory=dict)
    aborted_by_throttle: int = 0
    ttft_by_tenant_s: dict[str, list[float]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"ttft_p50_s": dict(self.ttft_p50_s), "ttft_p99_s": dict(self.ttft_p99_s),
                "throughput_tok_s": self.throughput_tok_s, "jain": self.jain, "lost": self.lost}


def figures(result: LoadResult) -> LoadFigures:
    """TTFT percentiles per kind of tenant, throughput and fairness over the load window.

    - Throughput: output tokens of requests that ended inside the window, per second of window
      (the drain after it is excluded, so a policy cannot gain by finishing more later).
    - Jain: over tenants, of service received / max-min fair share. Service is the output tokens
      of requests ended inside the window; demand is the output tokens a tenant asked for in the
      window (a closed-loop flooder is always backlogged: infinite demand); shares come from
      water-filling the total service. 1.0 means every tenant got its fair share.
    - Lost: requests without a complete answer (errors included); throttle aborts are counted
      apart, since they end with a reason.
    """
    window = result.duration_s
    ttft: dict[str, list[float]] = {FLOODER: [], WELL_BEHAVED: []}
    by_tenant: dict[str, list[float]] = {}
    served: dict[str, float] = {}
    demand: dict[str, float] = {}
    counts: dict[str, int] = {FLOODER: 0, WELL_BEHAVED: 0}
    closed_loop = {load.tenant for load in result.tenants if load.concurrency}
    tokens_in_window = 0
    for record in result.records:
        counts[record.kind] += 1
        served.setdefault(record.tenant, 0.0)
        demand[record.tenant] = demand.get(record.tenant, 0.0) + record.max_tokens
        if record.ttft_s is not None and record.completed:
            ttft[record.kind].append(record.ttft_s)
            by_tenant.setdefault(record.tenant, []).append(record.ttft_s)
        if record.completed and record.end_s is not None and record.end_s <= window:
            tokens_in_window += record.output_tokens
            served[record.tenant] += record.output_tokens
    for tenant in closed_loop & demand.keys():
        demand[tenant] = math.inf
    shares = max_min_fair_shares(demand, sum(served.values()))
    ratios = [served[t] / shares[t] for t in served if shares.get(t, 0) > 0]
    return LoadFigures(
        ttft_p50_s={kind: percentile(values, 50) for kind, values in ttft.items()},
        ttft_p99_s={kind: percentile(values, 99) for kind, values in ttft.items()},
        throughput_tok_s=tokens_in_window / window,
        jain=jain_index(ratios),
        lost=sum(record.lost for record in result.records),
        requests=counts,
        aborted_by_throttle=sum(r.finish_reason == "abort" for r in result.records if r.completed),
        ttft_by_tenant_s=by_tenant,
    )


def median_of(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def run(coroutine: Any) -> Any:
    """``asyncio.run`` (a name tests and the benchmark share)."""
    return asyncio.run(coroutine)
