"""ttserve over HTTP with the real `openai` client, on the tiny random Llama with SmolLM2's
tokenizer (fast): endpoints, streaming equals non-streaming, stop strings, usage, OpenAI
error objects for bad requests (400) and a full queue (429), disconnecting clients free
their pages, and a failing request never takes a running user down."""
from __future__ import annotations

import threading
import time

import httpx
import openai
import pytest

import runtime
from serve_helpers import TINY_PROGRAM, live_server, metrics, openai_client, tiny_chat_model

REQUIRED_METRICS = ("ttserve_requests_running", "ttserve_requests_waiting", "ttserve_kv_blocks_used",
                    "ttserve_kv_blocks_total", "ttserve_generated_tokens_total",
                    "ttserve_time_to_first_token_seconds_count", "ttserve_time_per_output_token_seconds_count")


@pytest.fixture(scope="module")
def program(tiny_model, smollm2_dir, compile_artifact):
    return compile_artifact(tiny_chat_model(tiny_model, smollm2_dir), **TINY_PROGRAM)


@pytest.fixture(scope="module")
def server(program):
    with live_server(program) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


def wait_for(condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def idle(server):
    m = metrics(server)
    return m["ttserve_kv_blocks_used"] == 0 and m["ttserve_requests_running"] == 0


class Gate:
    """Hold the engine thread inside its next decode step until opened."""

    def __init__(self, server, monkeypatch):
        self.open_event, self.held = threading.Event(), threading.Event()
        original = server.scheduler.engine.decode

        def decode(*args):
            self.held.set()
            self.open_event.wait(60)
            return original(*args)

        monkeypatch.setattr(server.scheduler.engine, "decode", decode)

    def open(self):
        self.open_event.set()


def test_endpoints(server, client):
    (model,) = client.models.list().data
    assert model.id == server.model_id == "serve-llama" and model.owned_by == "ttcompile"
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    m = metrics(server)
    assert all(name in m for name in REQUIRED_METRICS)
    assert m["ttserve_kv_blocks_total"] == 19  # 20 less the null block


def test_completion_stream_equals_whole(server, client):
    prompt = "Once upon a time"
    whole = client.completions.create(model=server.model_id, prompt=prompt, max_tokens=12, temperature=0)
    (choice,) = whole.choices
    n_prompt = len(server.session.tokenizer.encode(prompt))
    assert whole.object == "text_completion" and choice.finish_reason in ("stop", "length")
    assert whole.usage.prompt_tokens == n_prompt and 1 <= whole.usage.completion_tokens <= 12
    assert whole.usage.total_tokens == n_prompt + whole.usage.completion_tokens
    chunks = list(client.completions.create(model=server.model_id, prompt=prompt, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    ids = server.session.tokenizer.encode(prompt)  # a prompt of token ids gives the same
    assert client.completions.create(model=server.model_id, prompt=ids, max_tokens=12,
                                     temperature=0).choices[0].text == choice.text


def test_chat_stream_equals_whole(server, client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    whole = client.chat.completions.create(model=server.model_id, messages=messages, max_tokens=10, temperature=0)
    message = whole.choices[0].message
    assert whole.object == "chat.completion" and message.role == "assistant"
    assert whole.usage.prompt_tokens == len(server.session.tokenizer.encode_chat(messages))
    chunks = list(client.chat.completions.create(model=server.model_id, messages=messages, max_tokens=10,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_stop_strings_and_seeds(server, client):
    def complete(**options):
        return client.completions.create(model=server.model_id, prompt="The weather today", max_tokens=24,
                                         **options).choices[0]

    full = complete(temperature=0).text
    assert len(full) > 6, full
    stop = full[3:6]
    cut = complete(temperature=0, stop=[stop, "\x00never"])
    assert cut.text == full[:full.index(stop)] and cut.finish_reason == "stop"
    streamed = client.completions.create(model=server.model_id, prompt="The weather today", max_tokens=24,
                                         temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.text
    sampled = [complete(temperature=1.0, top_p=0.9, seed=5).text for _ in range(2)]
    assert sampled[0] == sampled[1]  # a seed makes sampling reproducible


@pytest.mark.parametrize("body, param", [
    (b'{"model": "serve-llama", "prompt": ', None),
    (b'{"model": "gpt-4", "prompt": "hi"}', "model"),
    (b'{"model": "serve-llama", "prompt": "hi", "max_tokens": -5}', "max_tokens"),
    (b'{"model": "serve-llama", "prompt": "hi", "max_tokens": 1000}', "max_tokens"),
    (b'{"model": "serve-llama", "prompt": "hi", "max_tokens": "ten"}', "max_tokens"),
    (b'{"model": "serve-llama", "prompt": ""}', "prompt"),
    (b'{"model": "serve-llama", "prompt": "hi", "temperature": [1]}', "temperature"),
])
def test_bad_completions_get_400(server, body, param):
    response = httpx.post(server.url + "/v1/completions", content=body, headers={"Content-Type": "application/json"},
                          timeout=120)
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param and error["message"]
    if param is not None:
        assert param in error["message"]


def test_bad_requests_through_the_client_and_the_server_keeps_serving(server, client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=server.model_id, messages=[], max_tokens=3)
    assert info.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="nope", prompt="x")
    assert info.value.code == "model_not_found"
    long_prompt = "word " * 300  # beyond the 256-token context
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=server.model_id, prompt=long_prompt, max_tokens=3)
    assert info.value.body["param"] == "prompt" and "context" in info.value.body["message"]
    missing = httpx.get(server.url + "/v1/nothing")
    assert missing.status_code == 404 and "error" in missing.json()
    ok = client.completions.create(model=server.model_id, prompt="Still there?", max_tokens=3, temperature=0)
    assert ok.usage.completion_tokens >= 1
    assert metrics(server)['ttserve_requests_rejected_total{status="400"}'] >= 3


def test_queue_full_gets_429(program, monkeypatch):
    with live_server(runtime.load(program), max_waiting=1) as server:
        client = openai_client(server)
        gate = Gate(server, monkeypatch)
        first = client.completions.create(model=server.model_id, prompt="One", max_tokens=4, temperature=0,
                                          stream=True)
        gate.held.wait(60)  # the engine is inside a decode step: nothing is admitted now
        results = {}
        waiting = threading.Thread(target=lambda: results.update(second=client.completions.create(
            model=server.model_id, prompt="Two", max_tokens=4, temperature=0)))
        waiting.start()
        wait_for(lambda: metrics(server)["ttserve_requests_waiting"] == 1)
        with pytest.raises(openai.RateLimitError) as info:
            client.completions.create(model=server.model_id, prompt="Three", max_tokens=4)
        assert info.value.status_code == 429 and info.value.body["type"] == "rate_limit_error"
        gate.open()
        assert [c.choices[0].finish_reason for c in first][-1] in ("stop", "length")
        waiting.join(60)
        assert results["second"].usage.completion_tokens >= 1
        wait_for(lambda: idle(server))


def test_disconnected_clients_free_their_pages(server, client):
    reference = client.completions.create(model=server.model_id, prompt="A story:", max_tokens=8, temperature=0)
    before = metrics(server).get('ttserve_requests_finished_total{reason="cancelled"}', 0)
    streams = []
    for i in range(10):
        streams.append(client.completions.create(model=server.model_id, prompt=f"Tell me about {i}",
                                                  max_tokens=200, temperature=0, stream=True))
    for stream in streams:
        next(iter(stream))  # the request is running
        stream.close()  # the client goes away mid-stream
    wait_for(lambda: idle(server))
    assert metrics(server)['ttserve_requests_finished_total{reason="cancelled"}'] >= before + 5
    again = client.completions.create(model=server.model_id, prompt="A story:", max_tokens=8, temperature=0)
    assert again.choices[0].text == reference.choices[0].text


def test_non_streaming_client_that_leaves_is_cancelled(server, monkeypatch):
    from runtime.serve.app import DISCONNECT_POLL_S

    before = metrics(server).get('ttserve_requests_finished_total{reason="cancelled"}', 0)
    gate = Gate(server, monkeypatch)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", timeout=0.5,
                   json={"model": server.model_id, "prompt": "Wait", "max_tokens": 100})
    time.sleep(3 * DISCONNECT_POLL_S)  # the handler notices the client has gone
    gate.open()
    wait_for(lambda: idle(server))
    assert metrics(server)['ttserve_requests_finished_total{reason="cancelled"}'] == before + 1


def test_a_failing_request_never_takes_a_running_user_down(server, client, monkeypatch):
    expected = client.completions.create(model=server.model_id, prompt="Count: one, two,", max_tokens=30,
                                         temperature=0).choices[0].text
    engine = server.scheduler.engine
    original = engine.prefill_chunk
    poison = server.session.tokenizer.encode("POISON")

    def prefill_chunk(token_ids, *args):
        if list(token_ids[: len(poison)]) == poison:
            raise RuntimeError("injected device failure")
        return original(token_ids, *args)

    monkeypatch.setattr(engine, "prefill_chunk", prefill_chunk)
    stream = client.completions.create(model=server.model_id, prompt="Count: one, two,", max_tokens=30,
                                       temperature=0, stream=True)
    chunks = iter(stream)
    text = next(chunks).choices[0].text
    with pytest.raises(openai.InternalServerError) as info:
        client.completions.create(model=server.model_id, prompt="POISON pill", max_tokens=5)
    assert "injected" in info.value.body["message"]
    text += "".join(c.choices[0].text for c in chunks)
    assert text == expected
    wait_for(lambda: idle(server))


def test_ttserve_command(program):
    """The console script: serves on the port it is given, answers, and stops on SIGTERM
    (uvicorn shuts down gracefully, then re-raises the signal)."""
    import re
    import signal
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = Path(sys.executable).with_name("ttserve")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "runtime.serve.cli"]
    process = subprocess.Popen(command + ["--program", str(program), "--port", str(port), "--max-waiting", "4"],
                               stderr=subprocess.PIPE, text=True)
    try:
        banner = process.stderr.readline()
        assert re.search(rf"serving serve-llama \(4 decode slots, 19 KV blocks\) at http://127.0.0.1:{port}", banner)
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.get(url + "/health").status_code == 200)
        answer = httpx.post(url + "/v1/completions", json={"model": "serve-llama", "prompt": "Hi", "max_tokens": 2},
                            timeout=120)  # a loaded machine: the first request waits for the load
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] >= 1
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) in (0, -signal.SIGTERM)
