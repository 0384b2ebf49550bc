"""The OpenAI-compatible server on a loopback port, with the tiny exported Llama."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from armquant.generate import Engine, EngineClosed, SamplingParams
from armquant.serve import build_server
from tiny_onnx import SlowSession, tiny_model_dir

pytestmark = pytest.mark.timeout(180)
MODEL = "tiny"


class Running:
    """A server thread on a loopback port picked by the OS."""

    def __init__(self, engine: Engine, **kwargs):
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.server = build_server(engine, model_name=MODEL, log_level="warning", **kwargs)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)
        self.socket.close()


def slow_engine(delay: float = 0.01, **kwargs) -> Engine:
    engine = Engine(tiny_model_dir(), threads=1, **kwargs)
    engine.session = SlowSession(engine.session, delay=delay)
    return engine


@pytest.fixture(scope="module")
def engine():
    with slow_engine(max_batch_size=4, max_queue=8) as engine:
        yield engine


@pytest.fixture(scope="module")
def server(engine):
    running = Running(engine, request_timeout=30)
    yield running
    running.stop()


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def sse_events(response) -> list:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_health_models_and_metrics(client):
    assert client.get("/health").json()["status"] == "ok"
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [MODEL]
    client.post("/v1/completions", json={"model": MODEL, "prompt": "hello", "max_tokens": 3, "temperature": 0})
    metrics = client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    for name in ["armquant_requests_total", "armquant_completion_tokens_total", "armquant_prompt_tokens_total",
                 "armquant_request_latency_seconds_bucket", "armquant_time_to_first_token_seconds_count",
                 "armquant_queue_depth", "armquant_active_requests"]:
        assert name in text, name
    line = next(l for l in text.splitlines() if l.startswith('armquant_requests_total{endpoint="/v1/completions",status="200"}'))
    assert float(line.split()[-1]) >= 1


def test_completion_matches_the_engine(client, engine):
    body = client.post("/v1/completions", json={"model": MODEL, "prompt": "the quick brown fox", "max_tokens": 8, "temperature": 0})
    assert body.status_code == 200, body.text
    data = body.json()
    expected = engine.complete("the quick brown fox", SamplingParams(max_tokens=8, temperature=0.0))
    assert data["object"] == "text_completion" and data["model"] == MODEL
    assert data["choices"][0]["text"] == expected
    assert data["choices"][0]["finish_reason"] in {"length", "stop"}
    usage = data["usage"]
    assert usage["prompt_tokens"] == len(engine.encode("the quick brown fox"))
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_streaming_completion_and_chat(client, engine):
    with client.stream("POST", "/v1/completions", json={"prompt": "hello", "max_tokens": 8, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] >= 1
    streamed = "".join(e["choices"][0]["text"] for e in events[:-2])
    assert streamed == engine.complete("hello", SamplingParams(max_tokens=8, temperature=0.0))
    assert events[-3]["choices"][0]["finish_reason"] in {"length", "stop"}

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    with client.stream("POST", "/v1/chat/completions", json={"messages": messages, "max_tokens": 6, "temperature": 0, "stream": True}) as response:
        events = sse_events(response)
    assert events[0]["object"] == "chat.completion.chunk" and events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] in {"length", "stop"}
    streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    whole = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 6, "temperature": 0}).json()
    assert whole["object"] == "chat.completion"
    assert whole["choices"][0]["message"] == {"role": "assistant", "content": streamed}
    assert streamed == engine.complete(engine.chat_prompt(messages), SamplingParams(max_tokens=6, temperature=0.0))


@pytest.mark.parametrize(
    "path, body, status, message",
    [
        ("/v1/completions", b"{not json", 400, "not valid JSON"),
        ("/v1/completions", b"[1, 2]", 400, "must be a JSON object"),
        ("/v1/completions", {"prompt": "hi", "best_of": 3}, 400, "unknown field 'best_of'; accepted fields are"),
        ("/v1/completions", {"max_tokens": 3}, 400, "field 'prompt' is required"),
        ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, r"temperature=-1.0 must be in \[0, 100\]"),
        ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, r"top_p=0.0 must be in \(0, 1\]"),
        ("/v1/completions", {"prompt": "hi", "top_k": -2}, 400, "top_k=-2 must be an integer >= 0"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens=0 must be an integer >= 1"),
        ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "field 'temperature'"),
        ("/v1/completions", {"prompt": "hi", "n": 2}, 400, "field 'n'"),
        ("/v1/completions", {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4"),
        ("/v1/completions", {"prompt": ""}, 400, "prompt is empty"),
        ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "'gpt-4' is not served here"),
        ("/v1/chat/completions", {"messages": []}, 400, "field 'messages'"),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "field 'messages.0.role'"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": []}, 400, "unknown field 'tools'"),
    ],
)
def test_bad_requests_get_clear_errors(client, path, body, status, message):
    import re

    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    response = client.post(path, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert re.search(message, error["message"]), error["message"]
    assert error["type"]


def test_prompt_over_the_context_length(client, engine):
    prompt = "one two three " * engine.context_length
    response = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and f"context length is {engine.context_length}" in error["message"]
    messages = [{"role": "user", "content": prompt}]
    response = client.post("/v1/chat/completions", json={"messages": messages})
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"


def wait_until(condition, seconds=30.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_disconnect_mid_stream_frees_the_slot(server, engine):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        with client.stream("POST", "/v1/completions", json={"prompt": "hello", "max_tokens": 120, "ignore_eos": True, "stream": True}) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            assert engine.active == 1
        # leaving the block closes the connection mid-stream
    wait_until(lambda: engine.active == 0 and engine.queue_depth == 0)
    metrics = httpx.get(server.url + "/metrics").text
    assert 'armquant_requests_total{endpoint="/v1/completions",status="499"}' in metrics


def test_disconnect_while_waiting_for_a_whole_completion():
    engine = slow_engine(delay=0.05, max_batch_size=1)
    running = Running(engine)
    try:
        body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 100, "ignore_eos": True}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(running.url + "/v1/chat/completions", json=body, timeout=0.5)  # gives up after 0.5 s of ~5 s
        wait_until(lambda: engine.active == 0, seconds=10)  # the 499 below tells a noticed disconnect from a natural end
        metrics = httpx.get(running.url + "/metrics").text
        assert 'armquant_requests_total{endpoint="/v1/chat/completions",status="499"} 1.0' in metrics
    finally:
        running.stop()
        engine.close(drain=False)


def test_full_queue_answers_503_and_timeouts_504():
    engine = slow_engine(max_batch_size=1, max_queue=1)
    running = Running(engine, request_timeout=30)
    try:
        with httpx.Client(base_url=running.url, timeout=30) as client:
            long = {"prompt": "hello", "max_tokens": 120, "ignore_eos": True, "stream": True}
            with client.stream("POST", "/v1/completions", json=long) as first:
                lines = first.iter_lines()  # kept alive: a dropped iterator closes the connection
                next(line for line in lines if line.startswith("data: "))  # holds the only slot
                queued = threading.Thread(target=lambda: httpx.post(running.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30))
                queued.start()
                wait_until(lambda: engine.queue_depth == 1)
                full = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
                assert full.status_code == 503 and full.headers["retry-after"] == "1"
                assert "max_queue=1" in full.json()["error"]["message"]
            queued.join(30)
    finally:
        running.stop()
        engine.close(drain=False)

    engine = Engine(tiny_model_dir(), max_batch_size=1, max_queue=1, threads=1)
    running = Running(engine, request_timeout=1e-4)
    try:
        response = httpx.post(running.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 100}, timeout=30)
        assert response.status_code == 504 and "timeout" in response.json()["error"]["message"]
        with httpx.stream("POST", running.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 100, "stream": True}, timeout=30) as r:
            events = sse_events(r)
        assert "timeout" in events[0]["error"]["message"] and events[-1] == "[DONE]"
    finally:
        running.stop()
        engine.close(drain=False)


def test_openai_client(server, engine):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=30, max_retries=0)
    assert [m.id for m in client.models.list()] == [MODEL]
    completion = client.completions.create(model=MODEL, prompt="hello", max_tokens=5, temperature=0)
    assert completion.choices[0].text == engine.complete("hello", SamplingParams(max_tokens=5, temperature=0.0))
    messages = [{"role": "user", "content": "hello"}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0, seed=7)
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0, seed=7, stream=True)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert chat.choices[0].message.content == streamed
    assert chat.usage.completion_tokens >= 1
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.completions.create(model=MODEL, prompt="hello", top_p=2.0)


SERVE_SLOWLY = """
import argparse, sys
sys.path.insert(0, {tests!r})
from tiny_onnx import SlowSession
from armquant import generate, serve

class SlowEngine(generate.Engine):  # 10 ms a step, so a 100-token stream is in flight at SIGTERM
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.session = SlowSession(self.session, 0.01)

serve.Engine = SlowEngine
parser = argparse.ArgumentParser()
serve.add_cli(parser.add_subparsers())
args = parser.parse_args(sys.argv[1:])
sys.exit(args.handler(args))
"""


def test_cli_serves_and_shuts_down_gracefully():
    """SIGTERM during a stream: the stream finishes, new connections are refused, the process ends cleanly."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = SERVE_SLOWLY.format(tests=str(Path(__file__).resolve().parent))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    command = [sys.executable, "-c", code, "serve", str(tiny_model_dir()), "--port", str(port), "--model-name", MODEL, "--threads", "1"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _up(url), seconds=90)
        body = {"prompt": "hello", "max_tokens": 100, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as response:
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            signalled = time.monotonic()
            process.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][len("data: "):])["choices"][0]["finish_reason"] == "length"
        assert time.monotonic() - signalled > 0.5  # the server waited for the stream (100 steps of 10 ms)
        assert process.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after a clean shutdown
        assert not _up(url)
    finally:
        if process.poll() is None:
            process.kill()
        output = process.communicate()[0]
    assert "Waiting for connections to close" in output and "Traceback" not in output, output


def test_shutdown_past_its_timeout_cancels_in_flight_work():
    engine = slow_engine(max_batch_size=2)
    running = Running(engine, shutdown_timeout=0.3, owns_engine=True)
    body = {"prompt": "hello", "max_tokens": 100, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", running.url + "/v1/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        stopped = time.monotonic()
        running.server.should_exit = True  # what uvicorn's SIGTERM handler does
        rest = []
        with contextlib.suppress(httpx.TransportError):
            rest.extend(line for line in lines if line.startswith("data: "))
    running.thread.join(30)
    assert not running.thread.is_alive() and time.monotonic() - stopped < 10
    assert "data: [DONE]" not in rest  # cut short, not finished
    assert engine.active == 0
    with pytest.raises(EngineClosed):  # the server closed the engine it owns
        engine.submit("hello", SamplingParams(max_tokens=1), print)


def _up(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False
